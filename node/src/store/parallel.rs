//! Parallel work. [`ordered`]: items from a producer are worked on by several threads, and the
//! results reach the consumer in the producer's order; at most `window` items are in flight, so
//! memory stays bounded however slow one item is. [`each`]: every item of a list worked on by
//! several threads, in no particular order, with nothing in flight but the items themselves.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

/// Runs `work` on every item of `items` with `workers` threads, each taking the next item not
/// yet taken, and stops at the first error: the threads finish the item they are on and take
/// no other. Returns that first error.
pub fn each<T, E>(
    items: &[T],
    workers: usize,
    work: impl Fn(&T) -> Result<(), E> + Sync,
) -> Result<(), E>
where
    T: Sync,
    E: Send,
{
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..workers.min(items.len()).max(1) {
            scope.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return;
                    };
                    if let Err(err) = work(item) {
                        failed.store(true, Ordering::Relaxed);
                        first_error
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(err);
                        return;
                    }
                }
            });
        }
    });
    match first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// Runs `work` on every item of `items` with `workers` threads and hands each result to
/// `consume` in order. Stops at the first error from `consume` (or from an item, when `R` is a
/// `Result` and `consume` returns it).
pub fn ordered<T, R, E>(
    items: impl Iterator<Item = T> + Send,
    workers: usize,
    window: usize,
    work: impl Fn(T) -> R + Sync,
    mut consume: impl FnMut(R) -> Result<(), E>,
) -> Result<(), E>
where
    T: Send,
    R: Send,
{
    // Never more threads than items: a build's small source must not pay for a pool.
    let known = items.size_hint().1;
    let workers = workers.min(known.unwrap_or(workers)).max(1);
    if known.is_some_and(|n| n <= 1) {
        for item in items {
            consume(work(item))?;
        }
        return Ok(());
    }
    let window = window.max(workers);
    // Tokens bound the items in flight: the producer takes one per item, the consumer gives it
    // back once the item's result is consumed.
    let (token_return, tokens): (SyncSender<()>, Receiver<()>) = sync_channel(window);
    for _ in 0..window {
        let _ = token_return.send(());
    }
    let (job_send, job_receive) = sync_channel::<(usize, T)>(window);
    let job_receive = Arc::new(Mutex::new(job_receive));
    let (result_send, result_receive) = sync_channel::<(usize, R)>(window);
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for (index, item) in items.enumerate() {
                if tokens.recv().is_err() || job_send.send((index, item)).is_err() {
                    return;
                }
            }
        });
        for _ in 0..workers {
            let jobs = Arc::clone(&job_receive);
            let results = result_send.clone();
            let work = &work;
            scope.spawn(move || {
                loop {
                    let job = jobs.lock().map(|j| j.recv());
                    let Ok(Ok((index, item))) = job else {
                        return;
                    };
                    if results.send((index, work(item))).is_err() {
                        return;
                    }
                }
            });
        }
        drop(result_send);
        let mut pending = BTreeMap::new();
        let mut next = 0;
        let mut outcome = Ok(());
        for (index, result) in result_receive.iter() {
            pending.insert(index, result);
            while let Some(result) = pending.remove(&next) {
                next += 1;
                if outcome.is_ok() {
                    outcome = consume(result);
                }
                let _ = token_return.send(());
            }
            if outcome.is_err() {
                // Dropping the receivers below ends the producer and the workers.
                break;
            }
        }
        drop(result_receive);
        drop(token_return);
        outcome
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_arrive_in_order() {
        let mut seen = Vec::new();
        let outcome: Result<(), ()> = ordered(
            0..200u64,
            3,
            8,
            |i| {
                // Later items finish first sometimes.
                std::thread::sleep(std::time::Duration::from_micros((200 - i) % 7 * 50));
                i * 2
            },
            |r| {
                seen.push(r);
                Ok(())
            },
        );
        assert!(outcome.is_ok());
        assert_eq!(seen, (0..200u64).map(|i| i * 2).collect::<Vec<_>>());
    }

    #[test]
    fn one_item_runs_inline() {
        let mut seen = Vec::new();
        let outcome: Result<(), ()> = ordered(
            std::iter::once(7),
            8,
            8,
            |i| i + 1,
            |r| {
                seen.push(r);
                Ok(())
            },
        );
        assert!(outcome.is_ok());
        assert_eq!(seen, vec![8]);
    }

    #[test]
    fn each_works_on_every_item_once() {
        let seen: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        let items: Vec<usize> = (0..1000).collect();
        let outcome: Result<(), ()> = each(&items, 3, |&i| {
            seen[i].fetch_add(1, Ordering::Relaxed);
            Ok(())
        });
        assert!(outcome.is_ok());
        assert!(seen.iter().all(|n| n.load(Ordering::Relaxed) == 1));
        assert!(each(&[] as &[u8], 4, |_| Err::<(), ()>(())).is_ok());
    }

    #[test]
    fn each_stops_at_the_first_error() {
        let done = AtomicUsize::new(0);
        let items: Vec<u64> = (0..100_000).collect();
        let outcome = each(&items, 2, |&i| {
            done.fetch_add(1, Ordering::Relaxed);
            if i == 10 { Err(i) } else { Ok(()) }
        });
        assert_eq!(outcome, Err(10));
        assert!(done.load(Ordering::Relaxed) < items.len());
    }

    #[test]
    fn an_error_stops_the_pipeline() {
        let mut seen = 0;
        let outcome = ordered(
            0..10_000u64,
            2,
            4,
            |i| i,
            |i| {
                seen += 1;
                if i == 5 { Err("stop") } else { Ok(()) }
            },
        );
        assert_eq!(outcome, Err("stop"));
        assert_eq!(seen, 6);
    }
}
