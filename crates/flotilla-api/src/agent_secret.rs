//! The per-node secret of agents that serve plain HTTP on loopback (`flotilla up`'s in-process
//! agent, standalone `flotilla agent`): the agent sends it when it registers, the manager keeps
//! it in a managers-only store [`Record`] (never in the `Node`, which any API reader and every
//! watch stream sees), and presents it as a bearer token whenever it calls that agent. Cluster
//! nodes' agents need none: their server takes only a manager's mTLS certificate.

use crate::AppState;
use flotilla_store::{Expect, Op, Record};

/// Store record key of `node`'s agent secret.
pub fn record_key(node: &str) -> String {
    format!("agent-secret/{node}")
}

/// The op storing `secret` for `node`, or `None` when the store already holds it.
pub(crate) fn put_op(app: &AppState, node: &str, secret: &str) -> Option<Op> {
    let key = record_key(node);
    let known = app.store.read(|s| {
        s.records
            .get(&key)
            .and_then(|r| r.value.as_str().map(|v| v == secret))
    });
    if known == Some(true) {
        return None;
    }
    Some(Op::PutRecord {
        record: Record {
            key,
            value: serde_json::Value::String(secret.to_string()),
            meta: Default::default(),
        },
        expect: Expect::Any,
    })
}

/// `req`, to `node`'s agent, carrying that agent's secret when it has one.
pub(crate) fn authorize(
    app: &AppState,
    node: &str,
    req: reqwest::RequestBuilder,
) -> reqwest::RequestBuilder {
    let key = record_key(node);
    let secret = app.store.read(|s| {
        s.records
            .get(&key)
            .and_then(|r| r.value.as_str().map(str::to_string))
    });
    match secret {
        Some(secret) => req.bearer_auth(secret),
        None => req,
    }
}
