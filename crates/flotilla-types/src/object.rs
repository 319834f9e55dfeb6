//! The object model: what every kind the store holds has in common.
//!
//! A kind is a plain data type with a key that names one object of that kind, a [`Meta`] that the
//! store stamps on every write, and a kind name used in messages and on the wire. The store, the
//! watch stream and the client's mirror work on any [`Object`]; a kind only says how to find its
//! key and meta.

use crate::release::Rollout;
use crate::state::{Meta, Node, Revision, Service, Task};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;

/// A stored object of one kind.
pub trait Object:
    Clone + Debug + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// What names one object of this kind; unique within the kind.
    type Key: Clone + Ord + Debug + Send + Sync + 'static;
    /// The kind's name in messages, such as `service` or `config`.
    const KIND: &'static str;

    fn key(&self) -> Self::Key;

    /// How messages name the object with `key`, such as `service "web"`.
    fn describe(key: &Self::Key) -> String;

    /// The store's bookkeeping. Kinds without their own (immutable ones) report a version of 0.
    fn meta(&self) -> Meta;

    /// Stamps the store's bookkeeping on a written object; a no-op for kinds without a `meta`.
    fn set_meta(&mut self, meta: Meta);
}

/// Implements [`Object`] for a kind keyed by one `String` field and carrying a `meta: Meta`:
/// `object_keyed_by!(Type, "kind", field)`, or with a fourth argument naming the key in messages
/// (`"rollout of service"`) when the kind name alone would not.
#[macro_export]
macro_rules! object_keyed_by {
    ($T:ty, $kind:literal, $field:ident) => {
        $crate::object_keyed_by!($T, $kind, $field, $kind);
    };
    ($T:ty, $kind:literal, $field:ident, $what:literal) => {
        impl $crate::Object for $T {
            type Key = String;
            const KIND: &'static str = $kind;
            fn key(&self) -> String {
                self.$field.clone()
            }
            fn describe(key: &String) -> String {
                format!(concat!($what, " {:?}"), key)
            }
            fn meta(&self) -> $crate::Meta {
                self.meta
            }
            fn set_meta(&mut self, meta: $crate::Meta) {
                self.meta = meta;
            }
        }
    };
}

object_keyed_by!(Service, "service", name);
object_keyed_by!(Task, "task", id);
object_keyed_by!(Node, "node", id);
// At most one release per service.
object_keyed_by!(Rollout, "rollout", service, "rollout of service");

/// Keyed by (service, number). Revisions are immutable and carry no [`Meta`].
impl Object for Revision {
    type Key = (String, u64);
    const KIND: &'static str = "revision";
    fn key(&self) -> (String, u64) {
        (self.service.clone(), self.number)
    }
    fn describe((service, number): &(String, u64)) -> String {
        format!("revision {number} of service {service:?}")
    }
    fn meta(&self) -> Meta {
        Meta {
            version: 0,
            created_at: self.created_at,
            updated_at: self.created_at,
        }
    }
    fn set_meta(&mut self, _: Meta) {}
}
