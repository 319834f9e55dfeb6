//! Container-only settings of a service (used by the docker driver): `user` lives on
//! [`ServiceSpec`](crate::ServiceSpec) because processes honour it too.

use serde::{Deserialize, Serialize};

/// Compose keys that only make sense for containers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {}

impl ContainerSpec {
    pub fn is_default(&self) -> bool {
        *self == ContainerSpec::default()
    }
}
