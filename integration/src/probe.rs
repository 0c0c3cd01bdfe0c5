//! A supervised test actor that can be told to panic, return an error, hang, or exit
//! normally, and a recorder of supervision events with their times.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef};
use strata_core::config::RestartType;
use strata_core::supervise::{ChildSpec, Event, EventSink};

pub enum ProbeMsg {
    /// Panic in the handler.
    Panic,
    /// Return an error from the handler.
    Fail,
    /// Sleep in the handler (does not answer a stop until it returns).
    Hang(Duration),
    /// Stop normally.
    Exit,
}

/// Per probe name: its current instance (none while it is down) and how often it was started.
type Instances = HashMap<String, (Option<ActorRef<ProbeMsg>>, u64)>;

/// The probes of a test: the current instance of each, and how often each was started.
#[derive(Clone, Default)]
pub struct Probes {
    inner: Arc<Mutex<Instances>>,
    hanging: Arc<Mutex<std::collections::HashSet<String>>>,
}

struct Probe {
    name: String,
    probes: Probes,
}

impl Actor for Probe {
    type Msg = ProbeMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, myself: ActorRef<ProbeMsg>, _: ()) -> Result<(), ActorProcessingErr> {
        let mut all = self.probes.inner.lock().unwrap();
        let entry = all.entry(self.name.clone()).or_default();
        entry.0 = Some(myself);
        entry.1 += 1;
        Ok(())
    }

    async fn handle(&self, myself: ActorRef<ProbeMsg>, msg: ProbeMsg, _: &mut ()) -> Result<(), ActorProcessingErr> {
        match msg {
            ProbeMsg::Panic => panic!("probe {} told to panic", self.name),
            ProbeMsg::Fail => Err(format!("probe {} told to fail", self.name).into()),
            ProbeMsg::Hang(d) => {
                self.probes.hanging.lock().unwrap().insert(self.name.clone());
                tokio::time::sleep(d).await;
                Ok(())
            }
            ProbeMsg::Exit => {
                myself.stop(Some("told to exit".into()));
                Ok(())
            }
        }
    }
}

impl Probes {
    /// A child spec starting probe `name`.
    pub fn child(&self, name: &str, restart: RestartType) -> ChildSpec {
        let probes = self.clone();
        let name = name.to_owned();
        ChildSpec {
            name: name.clone(),
            restart,
            start: Arc::new(move |parent: ActorCell| {
                let probe = Probe { name: name.clone(), probes: probes.clone() };
                Box::pin(async move { Actor::spawn_linked(None, probe, (), parent).await.map(|(r, _)| r.get_cell()).map_err(|e| e.to_string()) })
            }),
        }
    }

    /// Sends `msg` to the current instance of `name`.
    pub fn send(&self, name: &str, msg: ProbeMsg) {
        let current = self.inner.lock().unwrap().get(name).and_then(|e| e.0.clone()).expect("probe started");
        current.send_message(msg).expect("probe alive");
    }

    /// Waits (bounded) until `name` is inside a `Hang`.
    pub async fn wait_hanging(&self, name: &str, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while !self.hanging.lock().unwrap().contains(name) {
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// How many times `name` was started.
    pub fn starts(&self, name: &str) -> u64 {
        self.inner.lock().unwrap().get(name).map_or(0, |e| e.1)
    }

    /// Waits (bounded) until `name` was started `n` times.
    pub async fn wait_starts(&self, name: &str, n: u64, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if self.starts(name) >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.starts(name) >= n
    }
}

/// Records supervision events with the instant each was emitted.
#[derive(Clone, Default)]
pub struct Recorder {
    events: Arc<Mutex<Vec<(Instant, Event)>>>,
}

impl Recorder {
    pub fn sink(&self) -> EventSink {
        let events = self.events.clone();
        Arc::new(move |e| events.lock().unwrap().push((Instant::now(), e)))
    }

    pub fn events(&self) -> Vec<(Instant, Event)> {
        self.events.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.events.lock().unwrap().clear();
    }

    /// Waits (bounded) until an event matches `pred`.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&Event) -> bool) -> bool {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if self.events.lock().unwrap().iter().any(|(_, e)| pred(e)) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    /// The children stopped by the supervisor, in order.
    pub fn stopped(&self) -> Vec<(String, bool)> {
        self.events()
            .into_iter()
            .filter_map(|(_, e)| match e {
                Event::ChildStopped { child, killed, .. } => Some((child, killed)),
                _ => None,
            })
            .collect()
    }
}
