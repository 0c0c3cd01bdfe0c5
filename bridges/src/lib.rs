//! Strata's device bridges: actor kinds that connect a node to devices it does not run.
//!
//! | kind     | inputs            | outputs          | does |
//! |----------|-------------------|------------------|------|
//! | `mqtt`   | command streams   | reading streams  | subscribes to topic filters and appends each message as a reading (acknowledged to the broker only once durable); publishes commands to topics, in order, keeping them while the broker is away |
//! | `modbus` | command streams   | reading streams  | polls registers and coils of a Modbus TCP device into readings; writes commands to registers |
//!
//! Both reconnect with exponential backoff and jitter, show their connection state and
//! rejection counters in `strata status` (`reports.<actor>`), record connection changes and
//! expired commands on the node's `events` stream, and reject bad input with a counted
//! reason without stopping. Being actors, they are supervised like any other: a bridge that
//! fails is restarted and continues from its cursor (commands not yet sent are sent then).
//!
//! Register them next to the standard kinds: `strata_bridges::register(&mut registry)`.

pub mod modbus;
pub mod mqtt;
mod shared;

use strata_core::Registry;

/// Adds the bridge kinds (`mqtt`, `modbus`) to `registry`.
pub fn register(registry: &mut Registry) {
    registry.register("mqtt", mqtt::Mqtt::from_spec);
    registry.register("modbus", modbus::Modbus::from_spec);
}
