//! Starting a task on the thread that has it, and moving it to the runtime only once it waits.
//! A miss spawned onto the runtime first waits for a worker to wake up (a futex wake of a
//! parked thread: on this VM tens of microseconds), and only then sends its request. Polled
//! once where the FUSE request arrived, the request is on the wire before any other thread
//! runs; the rest (the answer's arrival) wakes the runtime as any task's I/O does. A read whose
//! bytes a fetch already brought in finishes in that first poll.

use crate::lock;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use tokio::runtime::Handle;

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

enum State {
    /// Being polled on the starting thread; whether it was woken meanwhile.
    FirstPoll { woken: bool },
    /// Waiting for its first wake, which spawns it.
    Waiting(Task),
    /// Spawned or finished: later wakes (from wakers it registered before) do nothing.
    Handed,
}

struct FirstWake {
    rt: Handle,
    state: Mutex<State>,
}

impl Wake for FirstWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut st = lock(&self.state);
        match std::mem::replace(&mut *st, State::Handed) {
            State::FirstPoll { .. } => *st = State::FirstPoll { woken: true },
            State::Waiting(task) => {
                drop(st);
                // The runtime polls it again with its own waker, which replaces this one
                // wherever the task waits.
                self.rt.spawn(task);
            }
            State::Handed => {}
        }
    }
}

/// Runs `fut` on this thread until it first waits, then on `rt`.
pub(super) fn spawn(rt: &Handle, fut: impl Future<Output = ()> + Send + 'static) {
    // Timers, sockets and spawns inside the task need the runtime's context.
    let _ctx = rt.enter();
    let mut task: Task = Box::pin(fut);
    let first = Arc::new(FirstWake { rt: rt.clone(), state: Mutex::new(State::FirstPoll { woken: false }) });
    let waker = Waker::from(first.clone());
    if task.as_mut().poll(&mut Context::from_waker(&waker)) == Poll::Ready(()) {
        *lock(&first.state) = State::Handed;
        return;
    }
    let mut st = lock(&first.state);
    if matches!(*st, State::FirstPoll { woken: true }) {
        *st = State::Handed;
        drop(st);
        rt.spawn(task);
    } else {
        *st = State::Waiting(task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
    }

    #[test]
    fn runs_here_until_it_waits_then_on_the_runtime() {
        let rt = runtime();
        let here = std::thread::current().id();
        let (tx, rx) = std::sync::mpsc::channel();
        spawn(rt.handle(), async move {
            let first = std::thread::current().id();
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tx.send((first, std::thread::current().id()));
        });
        let (first, after) = rx.recv_timeout(Duration::from_secs(5)).expect("the task finished");
        assert_eq!(first, here, "the first poll runs on the spawning thread");
        assert_ne!(after, here, "after its wait it runs on the runtime");
    }

    #[test]
    fn a_task_done_at_once_or_woken_during_its_first_poll_runs_exactly_to_the_end() {
        let rt = runtime();
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        spawn(rt.handle(), async move {
            d.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(done.load(Ordering::SeqCst), 1, "finished inline");
        // Wakes itself before returning Pending: must still be polled again.
        let d = done.clone();
        spawn(rt.handle(), async move {
            tokio::task::yield_now().await;
            d.fetch_add(1, Ordering::SeqCst);
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while done.load(Ordering::SeqCst) < 2 {
            assert!(std::time::Instant::now() < deadline, "a task woken during its first poll was lost");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
