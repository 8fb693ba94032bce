//! The delivery window: messages handed to librdkafka and not yet acknowledged, and the
//! source positions they hold back.
//!
//! Each message goes out with an id; Kafka's answers come back with it (through
//! [`StreamProducer`]) and feed the [`AckTracker`], whose safe position is what the source
//! may acknowledge. The window runs from the oldest unanswered message to the newest, so
//! bounding it (the pipeline takes no more changes past its bound) bounds the tracker too.

use std::collections::VecDeque;

use chrono::{DateTime, Utc};
use metrics::Counter;

use crate::kafka::{self, Delivery, StreamProducer};
use crate::{observe, offsets::AckTracker};

/// A message sent, by the id it was sent with: its change's position and time (commit time,
/// else capture time), and for an event its table's acknowledgement counter and commit time.
#[derive(Debug)]
struct InFlight<P> {
    position: P,
    time: DateTime<Utc>,
    event: Option<(Counter, Option<DateTime<Utc>>)>,
}

/// Messages handed to librdkafka and not yet acknowledged, and the positions they hold back.
#[derive(Debug)]
pub struct DeliveryWindow<P> {
    producer: StreamProducer,
    /// By id, from `first`, the oldest not answered yet, on. Ids are handed out in order and
    /// Kafka mostly answers in that order; an answer that comes early leaves its place empty
    /// until those before it came. So the length is the window from the oldest message
    /// waiting to the newest: bounding it bounds this and the tracker, also when one topic
    /// stalls while others are answered.
    in_flight: VecDeque<Option<InFlight<P>>>,
    first: usize,
    tracker: AckTracker<P>,
}

impl<P: Ord + Clone + std::fmt::Debug> DeliveryWindow<P> {
    /// An empty window sending through `producer`, with room for `capacity` messages.
    pub fn new(producer: StreamProducer, capacity: usize) -> Self {
        Self {
            producer,
            in_flight: VecDeque::with_capacity(capacity),
            first: 0,
            tracker: AckTracker::default(),
        }
    }

    /// Messages from the oldest unanswered to the newest.
    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// `messages` more messages (possibly none) will be sent for `position`.
    pub fn track(&mut self, position: P, messages: usize) {
        self.tracker.track(position, messages);
    }

    /// Nothing more will be sent for `position`.
    pub fn complete(&mut self, position: P) {
        self.tracker.complete(position);
    }

    /// The time of the oldest change with a message not yet acknowledged.
    pub fn oldest(&self) -> Option<DateTime<Utc>> {
        self.in_flight.front()?.as_ref().map(|m| m.time)
    }

    /// The highest position whose messages, and all before, Kafka has acknowledged.
    pub fn safe(&self) -> Option<&P> {
        self.tracker.safe()
    }

    /// Hand one message to librdkafka (which copies it); its acknowledgement counts for
    /// `position`, a change of `time`.
    pub async fn send(
        &mut self,
        (topic, key, payload): (&str, &str, &[u8]),
        headers: &[(&str, &str)],
        (position, time): (&P, DateTime<Utc>),
        event: Option<(Counter, Option<DateTime<Utc>>)>,
    ) -> Result<(), kafka::Error> {
        let id = self.first + self.in_flight.len();
        self.producer.send(id, topic, key, payload, headers).await?;
        self.in_flight.push_back(Some(InFlight {
            position: position.clone(),
            time,
            event,
        }));
        Ok(())
    }

    /// Count Kafka's answer about message `id`. A message Kafka refused after its retries
    /// stops the connector: nothing after it is acknowledged, so a restart writes it again.
    pub fn delivered(
        &mut self,
        (id, result): Delivery,
        commit_to_ack: &metrics::Histogram,
    ) -> Result<(), kafka::Error> {
        let Some(InFlight {
            position, event, ..
        }) = id
            .checked_sub(self.first)
            .and_then(|at| self.in_flight.get_mut(at))
            .and_then(Option::take)
        else {
            return Ok(());
        };
        while let Some(None) = self.in_flight.front() {
            self.in_flight.pop_front();
            self.first += 1;
        }
        result?;
        if let Some((acked, commit_time)) = event {
            acked.increment(1);
            if let Some(commit_time) = commit_time {
                commit_to_ack.record(observe::seconds_since(commit_time));
            }
        }
        self.tracker.acknowledge(&position);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::PgLsn;

    /// Kafka's answers out of order: the window keeps its oldest unanswered message, a
    /// position is safe only once every message at or before it is answered, and the
    /// window empties once all are. (The producer is never connected: librdkafka queues.)
    #[tokio::test]
    async fn the_window_of_messages_in_flight_starts_at_the_oldest_unanswered() {
        let properties = toml::from_str(r#""bootstrap.servers" = "127.0.0.1:9""#).unwrap();
        let (producer, _reports) = StreamProducer::new(&properties).unwrap();
        let mut sink = DeliveryWindow::new(producer, 4);
        // Ids 0 and 1 for the transaction at 10, 2 for the one at 20, 3 for the one at 30.
        for (lsn, messages) in [(10, 2), (20, 1), (30, 1)] {
            sink.track(PgLsn(lsn), messages);
            for _ in 0..messages {
                let message = ("t", "k", &b"v"[..]);
                let time = DateTime::from_timestamp(lsn as i64, 0).unwrap();
                sink.send(message, &[], (&PgLsn(lsn), time), None)
                    .await
                    .unwrap();
            }
            sink.complete(PgLsn(lsn));
        }
        let histogram = metrics::Histogram::noop();
        let answer =
            |sink: &mut DeliveryWindow<PgLsn>, id| sink.delivered((id, Ok((0, 0))), &histogram);

        answer(&mut sink, 2).unwrap();
        answer(&mut sink, 1).unwrap();
        assert_eq!(
            (sink.first, sink.in_flight.len()),
            (0, 4),
            "id 0 holds the window"
        );
        assert_eq!(sink.safe(), None);

        assert_eq!(sink.oldest().map(|t| t.timestamp()), Some(10));
        answer(&mut sink, 0).unwrap();
        assert_eq!((sink.first, sink.in_flight.len()), (3, 1));
        assert_eq!(sink.oldest().map(|t| t.timestamp()), Some(30));
        assert_eq!(sink.safe(), Some(&PgLsn(20)));

        // An answer about an id no longer (or never) in flight changes nothing.
        answer(&mut sink, 1).unwrap();
        answer(&mut sink, 7).unwrap();
        assert_eq!((sink.first, sink.in_flight.len()), (3, 1));

        let refused = sink.delivered(
            (3, Err(kafka::Error::Delivery("refused".into()))),
            &histogram,
        );
        assert!(refused.is_err(), "a refused message stops the stage");
        assert!(sink.in_flight.is_empty());
        assert_eq!(sink.safe(), Some(&PgLsn(20)), "30 is not safe");
    }
}
