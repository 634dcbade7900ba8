//! The channel from the engine thread to one reader: a generation's events, a score's answer.
//!
//! The engine thread must never block on a reader, so the channel is unbounded; instead it
//! counts what the reader has not taken yet ([`Tx::unread`]), which lets the step loop hold a
//! generation whose reader fell behind. The reader may block ([`Rx::recv`], for threads) or wait
//! as a task ([`Rx::poll_recv`], woken by every send and by the sender's end), so a server can
//! wait on thousands of them without a thread each.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SendError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// What both ends share: the count of untaken messages and the task waiting for the next one.
#[derive(Debug, Default)]
struct Signal {
    unread: AtomicUsize,
    waiting: Mutex<Option<Waker>>,
}

impl Signal {
    fn wake(&self) {
        let waiting = self
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(waker) = waiting {
            waker.wake();
        }
    }

    fn wait(&self, waker: &Waker) {
        *self.waiting.lock().unwrap_or_else(PoisonError::into_inner) = Some(waker.clone());
    }
}

/// The engine's end.
pub(crate) struct Tx<T> {
    /// `None` only while dropping: the channel must be closed before the reader is woken.
    tx: Option<Sender<T>>,
    signal: Arc<Signal>,
}

/// The reader's end.
pub(crate) struct Rx<T> {
    rx: Receiver<T>,
    signal: Arc<Signal>,
}

pub(crate) fn channel<T>() -> (Tx<T>, Rx<T>) {
    let (tx, rx) = mpsc::channel();
    let signal = Arc::new(Signal::default());
    let sender = Tx {
        tx: Some(tx),
        signal: signal.clone(),
    };
    (sender, Rx { rx, signal })
}

impl<T> Tx<T> {
    /// Sends `message`; fails when the reader is gone.
    pub(crate) fn send(&self, message: T) -> Result<(), SendError<T>> {
        let Some(tx) = &self.tx else {
            return Err(SendError(message));
        };
        self.signal.unread.fetch_add(1, Ordering::SeqCst);
        match tx.send(message) {
            Ok(()) => {
                self.signal.wake();
                Ok(())
            }
            Err(e) => {
                self.signal.unread.fetch_sub(1, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    /// Messages sent that the reader has not taken yet.
    pub(crate) fn unread(&self) -> usize {
        self.signal.unread.load(Ordering::SeqCst)
    }
}

impl<T> Drop for Tx<T> {
    fn drop(&mut self) {
        // Close the channel first, so that the woken reader finds it closed.
        drop(self.tx.take());
        self.signal.wake();
    }
}

impl<T> Rx<T> {
    /// The next message, blocking; `None` once the sender is gone and nothing is left.
    pub(crate) fn recv(&self) -> Option<T> {
        let message = self.rx.recv().ok()?;
        self.taken();
        Some(message)
    }

    /// The next message, blocking at most `timeout`.
    pub(crate) fn recv_timeout(&self, timeout: Duration) -> Result<T, RecvTimeoutError> {
        let message = self.rx.recv_timeout(timeout)?;
        self.taken();
        Ok(message)
    }

    /// The next message for a task: ready with `None` once the sender is gone and nothing is
    /// left; otherwise pending until a send (or the sender's end) wakes the task.
    pub(crate) fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut registered = false;
        loop {
            match self.rx.try_recv() {
                Ok(message) => {
                    self.taken();
                    return Poll::Ready(Some(message));
                }
                Err(TryRecvError::Disconnected) => return Poll::Ready(None),
                Err(TryRecvError::Empty) if registered => return Poll::Pending,
                // Register, then look once more: a message sent in between found no waker to
                // wake, but is in the channel now.
                Err(TryRecvError::Empty) => {
                    self.signal.wait(cx.waker());
                    registered = true;
                }
            }
        }
    }

    fn taken(&self) {
        self.signal.unread.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<T> std::fmt::Debug for Tx<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("unread", &self.unread())
            .finish()
    }
}

impl<T> std::fmt::Debug for Rx<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unread = self.signal.unread.load(Ordering::SeqCst);
        f.debug_struct("Rx").field("unread", &unread).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_waiting_task_is_woken_by_a_send_and_by_the_end_and_unread_is_counted() {
        let (tx, rx) = channel::<u32>();
        let wakes = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(rx.poll_recv(&mut cx).is_pending());
        tx.send(7).unwrap();
        tx.send(8).unwrap();
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            1,
            "woken once: one waker registered"
        );
        assert_eq!(tx.unread(), 2);
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(7)));
        assert_eq!(rx.recv(), Some(8));
        assert_eq!(tx.unread(), 0);
        assert!(rx.poll_recv(&mut cx).is_pending());
        drop(tx);
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            2,
            "the end wakes the reader"
        );
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(None));
    }

    #[test]
    fn a_send_to_a_gone_reader_fails_and_counts_nothing() {
        let (tx, rx) = channel::<u32>();
        drop(rx);
        assert!(tx.send(1).is_err());
        assert_eq!(tx.unread(), 0);
    }
}
