//! A batch: the readings decoded from some queue messages, and the acknowledgements owed for those
//! messages once the readings are stored. The consumer fills it; a writer stores and acknowledges it.

use models::Reading;

use crate::lag::Held;

pub struct Batch {
    pub readings: Vec<Reading>,
    pub acks: Vec<bus::Ack>,
    /// The messages' publish times, counted in the persister's lag until the batch is dropped.
    pub held: Held,
}
