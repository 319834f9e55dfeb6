//! How a service's new revisions replace old ones (`deploy.update_config`, `x-flotilla.strategy`).

use serde::{Deserialize, Serialize};

/// Release settings of a service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSpec {}

impl RolloutSpec {
    pub fn is_default(&self) -> bool {
        *self == RolloutSpec::default()
    }
}
