//! How far behind the persister is: the age of the oldest readings message it holds and has not
//! stored yet, from its publish (ingest's confirm, read from the message's id) to now. Messages
//! waiting in RabbitMQ are older still than those in hand, so a backlog shows as a growing age
//! once the persister reaches it; a persister that cannot write (PostgreSQL down) holds its batches
//! and their age grows as it retries.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// The publish times of the messages held, as a multiset (several messages share a millisecond).
#[derive(Default)]
pub struct HeldMessages {
    published: Mutex<BTreeMap<SystemTime, usize>>,
}

impl HeldMessages {
    /// How long the oldest message held has waited since its publish; zero when none is held.
    pub fn oldest_age(&self, now: SystemTime) -> Duration {
        let published = self.lock();
        published
            .keys()
            .next()
            .and_then(|oldest| now.duration_since(*oldest).ok())
            .unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SystemTime, usize>> {
        // A panic while holding the lock leaves a map that is still a valid multiset.
        self.published
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The messages of one batch, held until the batch is dropped (stored and acknowledged, or given
/// back to RabbitMQ with its channel).
pub struct Held {
    all: Arc<HeldMessages>,
    published: Vec<SystemTime>,
}

impl Held {
    pub fn new(all: Arc<HeldMessages>) -> Self {
        Self {
            all,
            published: Vec::new(),
        }
    }

    /// Counts a message published at `published` (messages whose id carries no time are not).
    pub fn add(&mut self, published: Option<SystemTime>) {
        let Some(published) = published else { return };
        *self.all.lock().entry(published).or_default() += 1;
        self.published.push(published);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut all = self.all.lock();
        for published in self.published.drain(..) {
            if let Some(count) = all.get_mut(&published) {
                *count -= 1;
                if *count == 0 {
                    all.remove(&published);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_message_held_counts_until_its_batch_is_dropped() {
        let all = Arc::new(HeldMessages::default());
        let now = SystemTime::now();
        let (old, recent) = (now - Duration::from_secs(90), now - Duration::from_secs(2));
        assert_eq!(all.oldest_age(now), Duration::ZERO);

        let mut first = Held::new(all.clone());
        first.add(Some(recent));
        first.add(None);
        let mut second = Held::new(all.clone());
        second.add(Some(old));
        second.add(Some(old));
        assert_eq!(all.oldest_age(now), Duration::from_secs(90));

        drop(second);
        assert_eq!(all.oldest_age(now), Duration::from_secs(2));
        drop(first);
        assert_eq!(all.oldest_age(now), Duration::ZERO);
    }
}
