//! Routing-mesh settings of a service (`x-flotilla.ports`, `x-flotilla.routes`, breakers).

use serde::{Deserialize, Serialize};

/// How the mesh exposes and protects a service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshSpec {}

impl MeshSpec {
    pub fn is_default(&self) -> bool {
        *self == MeshSpec::default()
    }
}
