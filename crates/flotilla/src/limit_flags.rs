//! The manager's task limits as flags (`up`, `init`, `join`): how many tasks one service and the
//! whole cluster may ask for before a deploy or scale is refused.

use clap::Args;
use flotilla_api::Limits;

#[derive(Debug, Args, Clone)]
pub struct LimitFlags {
    /// Most tasks one replicated service may ask for; a deploy or scale beyond it is refused.
    #[arg(long, default_value_t = Limits::DEFAULT_MAX_TASKS_PER_SERVICE, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_tasks_per_service: u64,
    /// Most tasks all services together may ask for; a deploy or scale beyond it is refused.
    /// Every task is a record each manager keeps in memory (about 2 KiB).
    #[arg(long, default_value_t = Limits::DEFAULT_MAX_TASKS, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_tasks: u64,
}

impl LimitFlags {
    pub fn limits(&self) -> Limits {
        Limits {
            max_tasks_per_service: self.max_tasks_per_service,
            max_tasks: self.max_tasks,
        }
    }
}
