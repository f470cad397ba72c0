//! Work on volumes that outlives its caller.
//!
//! A CSI caller gives up at its deadline (the sidecars' `--timeout`) and tonic then drops the
//! request handler. If the handler held the volume's lock while the backend went on copying in
//! the blocking pool, the lock would be released mid-work and the caller's retry would start a
//! second copy: two snapshots or two clones for one name, or two zeroing passes over one volume.
//!
//! So every operation that changes something runs as a task of its own, which takes its locks,
//! does all of its work and only then releases them, whether or not anyone still waits for the
//! answer. A retry while it runs finds the key held and answers ABORTED (see [`LockMap`]); a
//! retry after it ends finds the finished object. On shutdown the driver stops taking new work
//! and waits for what is running (a tool that changes on-disk metadata is never killed).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio_util::task::TaskTracker;

use crate::error::{Error, Result};
use crate::volume::locks::LockMap;

/// Runs operations to their end under their locks; clones share the same locks and tasks.
#[derive(Clone)]
pub struct Work {
    locks: LockMap,
    tasks: TaskTracker,
    stopping: Arc<AtomicBool>,
}

impl Work {
    pub fn new(locks: LockMap) -> Self {
        Work {
            locks,
            tasks: TaskTracker::new(),
            stopping: Arc::default(),
        }
    }

    /// Hold `key` until the guard drops, for work that is not one task (a snapshot read by a
    /// peer for as long as its stream runs).
    pub async fn lock(&self, key: impl Into<String>) -> Result<crate::volume::locks::VolumeGuard> {
        self.locks.lock(key).await
    }

    /// Run `op` on a task of its own holding `keys` (taken in the order given, so callers
    /// that share a fixed order never deadlock) until it ends. Dropping the returned future
    /// only stops the wait for the answer, never the operation or its locks.
    pub async fn run<T, Fut>(&self, keys: Vec<String>, op: Fut) -> Result<T>
    where
        T: Send + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(Error::Busy("this driver is stopping; retry".to_owned()));
        }
        let locks = self.locks.clone();
        let task = self.tasks.spawn(async move {
            let mut held = Vec::with_capacity(keys.len());
            for key in keys {
                held.push(locks.lock(key).await?);
            }
            let outcome = op.await;
            drop(held);
            outcome
        });
        task.await
            .map_err(|e| Error::Internal(format!("volume operation failed: {e}")))?
    }

    /// Operations still running, including those whose callers went away.
    pub fn running(&self) -> usize {
        self.tasks.len()
    }

    /// Refuse new operations and wait until every running one has ended.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.tasks.close();
        if !self.tasks.is_empty() {
            tracing::info!(
                running = self.tasks.len(),
                "waiting for running volume operations before stopping"
            );
        }
        self.tasks.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::oneshot;

    fn work() -> Work {
        Work::new(LockMap::with_wait(Duration::from_millis(50)))
    }

    #[tokio::test]
    async fn a_dropped_caller_leaves_the_operation_running_and_its_lock_held() {
        let work = work();
        let (release, released) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let caller = work.run(vec!["vol".into()], async move {
            let _ = released.await;
            let _ = done_tx.send(());
            Ok(())
        });
        // The caller gives up at its deadline while the work is under way.
        let gave_up = tokio::time::timeout(Duration::from_millis(30), caller).await;
        assert!(gave_up.is_err(), "the operation cannot have finished yet");
        assert_eq!(work.running(), 1, "the operation stopped with its caller");

        // A retry meanwhile is told the volume is busy instead of starting a second copy.
        let retry = work.run(vec!["vol".into()], async { Ok(()) }).await;
        assert!(
            matches!(retry, Err(Error::Busy(ref k)) if k == "vol"),
            "{retry:?}"
        );

        release.send(()).unwrap();
        done_rx
            .await
            .expect("the abandoned operation ran to its end");
        tokio::time::timeout(Duration::from_secs(5), async {
            while work.running() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the task ends");
        work.run(vec!["vol".into()], async { Ok(()) })
            .await
            .expect("free once the work has ended");
    }

    #[tokio::test]
    async fn stop_waits_for_running_work_and_refuses_new_work() {
        let work = work();
        let (release, released) = oneshot::channel::<()>();
        let running = tokio::spawn({
            let work = work.clone();
            async move {
                work.run(vec!["a".into()], async move {
                    let _ = released.await;
                    Ok(7)
                })
                .await
            }
        });
        while work.running() == 0 {
            tokio::task::yield_now().await;
        }
        let stop = tokio::spawn({
            let work = work.clone();
            async move { work.stop().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!stop.is_finished(), "stop returned with work still running");
        let refused = work.run(vec!["b".into()], async { Ok(()) }).await;
        assert!(matches!(refused, Err(Error::Busy(_))), "{refused:?}");
        release.send(()).unwrap();
        assert_eq!(running.await.unwrap().unwrap(), 7);
        tokio::time::timeout(Duration::from_secs(5), stop)
            .await
            .expect("stop returns once the work has ended")
            .unwrap();
    }
}
