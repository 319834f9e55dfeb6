//! The threads that run the mesh's connections: one single-threaded runtime per core, as nginx
//! runs one event loop per worker process. The accept loops hand each new connection to the
//! next worker in turn and it stays there, so the wake-ups of a proxied request (client socket,
//! backend socket, timers) never cross threads, and no worker steals from or parks on another
//! one's queue, which tokio's shared multi-thread scheduler does on every idle moment.

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

pub(crate) struct Workers {
    handles: Vec<Handle>,
    next: std::sync::atomic::AtomicUsize,
    /// Ends the worker threads (each drops its runtime, and the connections on it, on its way
    /// out) when the mesh is dropped.
    stop: CancellationToken,
}

impl Workers {
    /// `count` workers (0: one per available core). If none can be started, connections run
    /// on the runtime that accepts them.
    pub fn start(count: usize) -> Self {
        let count = match count {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(count);
        for i in 0..count {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::warn!(error = %e, "mesh worker runtime not started");
                    break;
                }
            };
            let handle = runtime.handle().clone();
            let stop = stop.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("mesh-worker-{i}"))
                .spawn(move || runtime.block_on(stop.cancelled()));
            match spawned {
                Ok(_) => handles.push(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "mesh worker thread not started");
                    break;
                }
            }
        }
        Workers {
            handles,
            next: std::sync::atomic::AtomicUsize::new(0),
            stop,
        }
    }

    /// The worker for the next connection, round robin; `None` without workers.
    pub fn next(&self) -> Option<&Handle> {
        if self.handles.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(&self.handles[i % self.handles.len()])
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
