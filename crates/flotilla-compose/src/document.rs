//! The YAML document as a plain, order-preserving value tree.
//!
//! Compose files are read into this tree first and walked by hand afterwards, so that every
//! problem can be reported with its full field path instead of serde's first-error-wins message.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// One YAML node. Mappings keep document order so services come out in the order they were written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    Null,
    Bool(bool),
    /// Wide enough for both `i64` and `u64` scalars.
    Int(i128),
    Float(f64),
    Str(String),
    List(Vec<Node>),
    Map(Vec<(String, Node)>),
}

impl Node {
    /// The node's type as a phrase for "expected X, got Y" messages.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Node::Null => "null",
            Node::Bool(_) => "a boolean",
            Node::Int(_) | Node::Float(_) => "a number",
            Node::Str(_) => "a string",
            Node::List(_) => "a list",
            Node::Map(_) => "a mapping",
        }
    }

    /// The text of a scalar (strings, numbers, booleans); `None` for null, lists and mappings.
    pub(crate) fn scalar_text(&self) -> Option<String> {
        match self {
            Node::Bool(b) => Some(b.to_string()),
            Node::Int(i) => Some(i.to_string()),
            Node::Float(f) => Some(f.to_string()),
            Node::Str(s) => Some(s.clone()),
            Node::Null | Node::List(_) | Node::Map(_) => None,
        }
    }
}

/// Parses one YAML document. Duplicate keys are a syntax error (serde-saphyr's default policy).
pub(crate) fn parse_yaml(text: &str) -> Result<Node, serde_saphyr::Error> {
    serde_saphyr::from_str(text)
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Node, E> {
        Ok(Node::Int(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Node, E> {
        i128::try_from(v)
            .map(Node::Int)
            .map_err(|_| E::custom(format!("integer {v} is too large")))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }
    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Node::List(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(ScalarKey(key)) = map.next_key::<ScalarKey>()? {
            entries.push((key, map.next_value::<Node>()?));
        }
        Ok(Node::Map(entries))
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

/// A mapping key. Compose keys are strings, but YAML lets people write `80:` or `true:`, which we
/// keep as their text so the walker can report them by name.
struct ScalarKey(String);

struct ScalarKeyVisitor;

impl Visitor<'_> for ScalarKeyVisitor {
    type Value = ScalarKey;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a scalar mapping key")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<ScalarKey, E> {
        Ok(ScalarKey(v.to_string()))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<ScalarKey, E> {
        Ok(ScalarKey(v.to_string()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<ScalarKey, E> {
        Ok(ScalarKey(v.to_string()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<ScalarKey, E> {
        Ok(ScalarKey(v.to_string()))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<ScalarKey, E> {
        Ok(ScalarKey(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<ScalarKey, E> {
        Ok(ScalarKey(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<ScalarKey, E> {
        Ok(ScalarKey("null".to_string()))
    }
}

impl<'de> Deserialize<'de> for ScalarKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarKeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_types() {
        let node = parse_yaml("b: 1\na: [x, -2, 1.5, true, null]\n80: {}\n").unwrap();
        assert_eq!(
            node,
            Node::Map(vec![
                ("b".into(), Node::Int(1)),
                (
                    "a".into(),
                    Node::List(vec![
                        Node::Str("x".into()),
                        Node::Int(-2),
                        Node::Float(1.5),
                        Node::Bool(true),
                        Node::Null
                    ])
                ),
                ("80".into(), Node::Map(vec![])),
            ])
        );
    }

    #[test]
    fn quoted_numbers_stay_strings() {
        assert_eq!(
            parse_yaml("a: \"3\"\n").unwrap(),
            Node::Map(vec![("a".into(), Node::Str("3".into()))])
        );
    }

    #[test]
    fn syntax_error_has_line() {
        let err = parse_yaml("a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert!(err.location().is_some_and(|l| l.line() >= 2), "{err}");
    }
}
