//! A linearizability checker for a history of operations on independent keys, each a register
//! holding `Option<u64>` (a service that is absent, or present with a spec version).
//!
//! The algorithm is Wing & Gong's as refined by Lowe and used by porcupine: walk the history's
//! call/return entries in time order, tentatively linearize any call whose operation the model
//! accepts in the current state, backtrack when a return is reached whose operation has not
//! been linearized, and prune states already seen (linearized set + model state). Keys are
//! checked separately (a register per key is a P-compositional model).
//!
//! An operation whose outcome is unknown (the client gave up, or the connection broke) has no
//! return: it may take effect at any point after its call, or never, which porcupine models as a
//! return at infinity with an output the model accepts in any state.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};

/// What the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Create or update the service so that its value is `v` (values are unique per history).
    Put(u64),
    /// Remove the service.
    Delete,
    /// Read the service's value.
    Read,
}

/// What the client observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// The put was acknowledged as a create (`false`) or an update (`true`).
    Put {
        existed: bool,
    },
    /// The delete was acknowledged (`true`) or answered "not found" (`false`).
    Delete {
        existed: bool,
    },
    Read(Option<u64>),
    /// No answer: the operation may or may not have taken effect.
    Unknown,
}

#[derive(Debug, Clone)]
pub struct Operation {
    pub key: String,
    pub input: Input,
    pub output: Output,
    /// Invocation time (any monotonic unit, e.g. ns since the test started).
    pub call: u64,
    /// Response time; `None` when `output` is `Unknown`.
    pub ret: Option<u64>,
}

/// The register model: the next state, or `None` if `output` is impossible in `state`.
fn step(state: Option<u64>, input: &Input, output: &Output) -> Option<Option<u64>> {
    match (input, output) {
        (Input::Put(v), Output::Unknown) => Some(Some(*v)),
        (Input::Put(v), Output::Put { existed }) => {
            (*existed == state.is_some()).then_some(Some(*v))
        }
        (Input::Delete, Output::Unknown) => Some(None),
        (Input::Delete, Output::Delete { existed }) => {
            (*existed == state.is_some()).then_some(None)
        }
        (Input::Read, Output::Read(seen)) => (*seen == state).then_some(state),
        (Input::Read, Output::Unknown) => Some(state),
        _ => None,
    }
}

/// Checks every key's history; `Err` names the first key whose history is not linearizable,
/// with its operations.
pub fn check(history: &[Operation]) -> Result<(), String> {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in history {
        by_key.entry(&op.key).or_default().push(op);
    }
    for (key, ops) in by_key {
        if !check_key(&ops) {
            let mut lines: Vec<String> = ops
                .iter()
                .map(|o| {
                    let ret = o.ret.map_or("-".to_string(), |r| r.to_string());
                    format!("  [{}, {ret}] {:?} -> {:?}", o.call, o.input, o.output)
                })
                .collect();
            lines.sort();
            return Err(format!(
                "history of {key} is not linearizable:\n{}",
                lines.join("\n")
            ));
        }
    }
    Ok(())
}

const NIL: usize = usize::MAX;

/// WGL on one register, starting from "absent".
fn check_key(ops: &[&Operation]) -> bool {
    // Entries 1..=2n in time order (calls before returns at equal times, which treats touching
    // operations as concurrent); index 0 is the list head.
    let mut order: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
    for (i, op) in ops.iter().enumerate() {
        order.push((op.call, false, i));
        let ret = match (&op.output, op.ret) {
            (Output::Unknown, _) | (_, None) => u64::MAX,
            (_, Some(r)) => r,
        };
        order.push((ret, true, i));
    }
    order.sort();
    let n = order.len();
    let mut op_of = vec![NIL; n + 1];
    let mut is_call = vec![false; n + 1];
    let mut partner = vec![NIL; n + 1];
    let mut call_entry = vec![NIL; ops.len()];
    let mut ret_entry = vec![NIL; ops.len()];
    for (pos, &(_, is_ret, i)) in order.iter().enumerate() {
        let e = pos + 1;
        op_of[e] = i;
        is_call[e] = !is_ret;
        if is_ret {
            ret_entry[i] = e;
        } else {
            call_entry[i] = e;
        }
    }
    for i in 0..ops.len() {
        partner[call_entry[i]] = ret_entry[i];
    }
    let mut next: Vec<usize> = (1..=n + 1).map(|e| if e > n { NIL } else { e }).collect();
    let mut prev: Vec<usize> = (0..=n).map(|e| e.wrapping_sub(1)).collect();
    prev[0] = NIL;

    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, e: usize| {
        next[prev[e]] = next[e];
        if next[e] != NIL {
            prev[next[e]] = prev[e];
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, e: usize| {
        next[prev[e]] = e;
        if next[e] != NIL {
            prev[next[e]] = e;
        }
    };

    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut state: Option<u64> = None;
    let mut seen: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    let mut calls: Vec<(usize, Option<u64>)> = Vec::new();
    let mut entry = next[0];
    while next[0] != NIL {
        if entry == NIL {
            // Only reachable if every remaining entry is a call that cannot be linearized and
            // no return follows, which the pairing of entries rules out; treat as a failure.
            return false;
        }
        let i = op_of[entry];
        if is_call[entry] {
            if let Some(new_state) = step(state, &ops[i].input, &ops[i].output) {
                let mut l = linearized.clone();
                l[i / 64] |= 1 << (i % 64);
                if seen.insert((l.clone(), new_state)) {
                    calls.push((entry, state));
                    state = new_state;
                    linearized = l;
                    unlink(&mut next, &mut prev, entry);
                    unlink(&mut next, &mut prev, partner[entry]);
                    entry = next[0];
                    continue;
                }
            }
            entry = next[entry];
        } else {
            // A return whose call is not linearized yet: undo the last choice.
            let Some((call, old_state)) = calls.pop() else {
                return false;
            };
            let j = op_of[call];
            state = old_state;
            linearized[j / 64] &= !(1 << (j % 64));
            relink(&mut next, &mut prev, partner[call]);
            relink(&mut next, &mut prev, call);
            entry = next[call];
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(input: Input, output: Output, call: u64, ret: u64) -> Operation {
        Operation {
            key: "k".into(),
            input,
            output,
            call,
            ret: Some(ret),
        }
    }

    fn put(v: u64, existed: bool, call: u64, ret: u64) -> Operation {
        op(Input::Put(v), Output::Put { existed }, call, ret)
    }

    fn read(v: Option<u64>, call: u64, ret: u64) -> Operation {
        op(Input::Read, Output::Read(v), call, ret)
    }

    fn unknown(input: Input, call: u64) -> Operation {
        Operation {
            key: "k".into(),
            input,
            output: Output::Unknown,
            call,
            ret: None,
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            put(1, false, 0, 10),
            put(2, true, 20, 30),
            read(Some(2), 40, 50),
            op(Input::Delete, Output::Delete { existed: true }, 60, 70),
            op(Input::Delete, Output::Delete { existed: false }, 80, 90),
            read(None, 100, 110),
        ];
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn stale_read_after_a_completed_write_is_rejected() {
        let h = vec![
            put(1, false, 0, 10),
            put(2, true, 20, 30),
            // Invoked after put(2) returned, yet sees 1: a lost or stale write.
            read(Some(1), 40, 50),
        ];
        let err = check(&h).unwrap_err();
        assert!(err.contains("not linearizable"), "{err}");
    }

    #[test]
    fn concurrent_writes_may_be_read_in_either_order() {
        for seen in [1, 2] {
            let h = vec![
                put(1, false, 0, 30),
                put(2, true, 5, 35),
                read(Some(seen), 40, 50),
            ];
            // put(2) reports "existed", so put(1) must come first; only 2 can be read after.
            assert_eq!(check(&h).is_ok(), seen == 2, "read {seen}");
        }
        let h = vec![
            put(1, false, 0, 30),
            put(2, false, 5, 35),
            read(Some(1), 40, 50),
        ];
        // Both claim to have created the service: impossible whatever the order.
        assert!(check(&h).is_err());
    }

    #[test]
    fn an_acknowledged_delete_is_not_undone() {
        let h = vec![
            put(1, false, 0, 10),
            op(Input::Delete, Output::Delete { existed: true }, 20, 30),
            read(Some(1), 40, 50),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn an_unknown_write_may_or_may_not_take_effect() {
        for seen in [None, Some(7)] {
            let h = vec![unknown(Input::Put(7), 0), read(seen, 100, 110)];
            assert_eq!(check(&h), Ok(()), "read {seen:?}");
        }
        // But it cannot take effect before it was invoked.
        let h = vec![read(Some(7), 0, 10), unknown(Input::Put(7), 20)];
        assert!(check(&h).is_err());
    }

    #[test]
    fn a_second_create_must_see_the_first() {
        // Sequential creates both reporting "created" lose the first write.
        let h = vec![put(1, false, 0, 10), put(2, false, 20, 30)];
        assert!(check(&h).is_err());
    }

    #[test]
    fn keys_are_checked_separately() {
        let mut a = put(1, false, 0, 10);
        a.key = "a".into();
        let mut b = put(2, false, 0, 10);
        b.key = "b".into();
        assert_eq!(check(&[a, b]), Ok(()));
    }
}
