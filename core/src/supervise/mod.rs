//! OTP-style supervision on ractor.
//!
//! ractor reports a linked child's exit to its supervisor (`handle_supervisor_evt`) and
//! restarts nothing by itself. [`Supervisor`] adds what Erlang/OTP operators expect:
//!
//! - strategies `one_for_one`, `one_for_all`, `rest_for_one`;
//! - child restart types `permanent`, `transient` (not after a normal exit), `temporary`;
//! - restart intensity: more than `restarts_max` restarts within `restart_window_ms` and the
//!   supervisor stops its children (reverse start order) and fails, so that its own parent
//!   decides (escalation); at the root the node records the incident and exits non-zero;
//! - exponential backoff with jitter between restarts;
//! - orderly shutdown: children stop in reverse start order, each within
//!   `child_shutdown_timeout_ms`, and are killed if they do not.
//!
//! The decisions themselves are pure ([`policy`]). Every start, exit, restart, stop and
//! escalation is reported to an [`EventSink`]; the node appends them to its `events` stream.
//! A supervisor's mailbox holds only its own timers and control messages.

pub mod policy;

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use rand::Rng;
use serde::Serialize;

use crate::bus::BoxFut;
use crate::config::RestartType;
use crate::model::MonoClock;
use policy::{backoff, plan, should_restart, Intensity, Policy};

/// Starts a child linked to the given supervisor; returns its cell.
pub type StartFn = Arc<dyn Fn(ActorCell) -> BoxFut<'static, Result<ActorCell, String>> + Send + Sync>;

/// One child of a supervisor.
#[derive(Clone)]
pub struct ChildSpec {
    pub name: String,
    pub restart: RestartType,
    pub start: StartFn,
}

/// What a supervisor did, for the `events` stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    ChildStarted { supervisor: String, child: String, restarts: u64 },
    ChildExited { supervisor: String, child: String, failed: bool, reason: String },
    RestartScheduled { supervisor: String, children: Vec<String>, attempt: usize, delay_ms: u64 },
    ChildStopped { supervisor: String, child: String, killed: bool },
    Escalated { supervisor: String, reason: String },
}

/// Receives every [`Event`]; must not block.
pub type EventSink = Arc<dyn Fn(Event) + Send + Sync>;

/// A child's state, as status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChildInfo {
    pub name: String,
    pub state: &'static str,
    pub restarts: u64,
}

pub struct SupervisorArgs {
    pub name: String,
    pub policy: Policy,
    pub children: Vec<ChildSpec>,
    pub events: EventSink,
}

pub enum SupervisorMsg {
    /// Start again the children that wait for a restart (sent to itself after the backoff).
    Restart,
    /// Stop the children in reverse order, then the supervisor; replies when done.
    Shutdown(RpcReplyPort<()>),
    Children(RpcReplyPort<Vec<ChildInfo>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Running,
    Waiting,
    Stopped,
}

struct Slot {
    spec: ChildSpec,
    cell: Option<ActorCell>,
    status: Status,
    restarts: u64,
}

pub struct SupervisorState {
    name: String,
    policy: Policy,
    slots: Vec<Slot>,
    intensity: Intensity,
    events: EventSink,
    clock: MonoClock,
}

/// The supervisor behaviour.
pub struct Supervisor;

impl Supervisor {
    /// A [`ChildSpec`] that starts a supervisor with `args` under another supervisor.
    pub fn child_spec(make_args: Arc<dyn Fn() -> SupervisorArgs + Send + Sync>, restart: RestartType) -> ChildSpec {
        let name = make_args().name;
        ChildSpec {
            name,
            restart,
            start: Arc::new(move |parent: ActorCell| {
                let args = make_args();
                Box::pin(async move { Actor::spawn_linked(None, Supervisor, args, parent).await.map(|(r, _)| r.get_cell()).map_err(|e| e.to_string()) })
            }),
        }
    }
}

impl SupervisorState {
    fn emit(&self, event: Event) {
        tracing::info!(?event, "supervision");
        (self.events)(event);
    }

    async fn start_child(&mut self, myself: &ActorRef<SupervisorMsg>, i: usize) -> Result<(), String> {
        let start = self.slots[i].spec.start.clone();
        let cell = start(myself.get_cell()).await?;
        let slot = &mut self.slots[i];
        slot.cell = Some(cell);
        slot.status = Status::Running;
        let (child, restarts) = (slot.spec.name.clone(), slot.restarts);
        self.emit(Event::ChildStarted { supervisor: self.name.clone(), child, restarts });
        Ok(())
    }

    /// Stops child `i` if it runs: gracefully within the timeout, else killed.
    async fn stop_child(&mut self, i: usize) {
        let Some(cell) = self.slots[i].cell.take() else { return };
        let timeout = self.policy.child_shutdown_timeout;
        let killed = match cell.stop_and_wait(Some("supervisor stop".into()), Some(timeout)).await {
            Ok(()) => false,
            Err(_) => {
                let _ = cell.kill_and_wait(Some(timeout)).await;
                true
            }
        };
        let child = self.slots[i].spec.name.clone();
        self.emit(Event::ChildStopped { supervisor: self.name.clone(), child, killed });
    }

    async fn stop_all(&mut self) {
        for i in (0..self.slots.len()).rev() {
            self.stop_child(i).await;
            if self.slots[i].status == Status::Waiting {
                self.slots[i].status = Status::Stopped;
            }
        }
    }

    /// Child `i` exited (or failed to start). Restarts what the strategy says after the
    /// backoff, or gives up (Err) when the intensity is exceeded. Returns whether a restart
    /// was scheduled.
    async fn on_exit(&mut self, myself: &ActorRef<SupervisorMsg>, i: usize, failed: bool, reason: String) -> Result<bool, ActorProcessingErr> {
        let child = self.slots[i].spec.name.clone();
        self.slots[i].cell = None;
        self.emit(Event::ChildExited { supervisor: self.name.clone(), child: child.clone(), failed, reason: reason.clone() });
        if !should_restart(self.slots[i].spec.restart, failed) {
            self.slots[i].status = Status::Stopped;
            return Ok(false);
        }
        if !self.intensity.record(self.clock.now()) {
            let why = format!(
                "restart intensity exceeded: more than {} restarts in {} ms (last: {child}: {reason})",
                self.policy.restarts_max,
                self.policy.window.as_millis()
            );
            self.stop_all().await;
            self.emit(Event::Escalated { supervisor: self.name.clone(), reason: why.clone() });
            return Err(why.into());
        }
        let (stop, restart) = plan(self.policy.strategy, i, self.slots.len());
        for j in stop {
            if self.slots[j].status == Status::Running {
                self.stop_child(j).await;
                // A temporary child is never restarted, also when a sibling's failure stopped
                // it (as in OTP).
                self.slots[j].status = if self.slots[j].spec.restart == RestartType::Temporary { Status::Stopped } else { Status::Waiting };
            }
        }
        let restart: Vec<usize> = restart.into_iter().filter(|&j| j == i || self.slots[j].status == Status::Waiting).collect();
        for &j in &restart {
            self.slots[j].status = Status::Waiting;
            self.slots[j].restarts += 1;
        }
        let attempt = self.intensity.count();
        let delay = backoff(&self.policy, attempt, rand::thread_rng().gen_range(0.0..1.0));
        let children = restart.iter().map(|&j| self.slots[j].spec.name.clone()).collect();
        self.emit(Event::RestartScheduled { supervisor: self.name.clone(), children, attempt, delay_ms: delay.as_millis() as u64 });
        if delay.is_zero() {
            // tokio timers have 1 ms granularity: do not wait for one for nothing.
            myself.send_message(SupervisorMsg::Restart)?;
        } else {
            myself.send_after(delay, || SupervisorMsg::Restart);
        }
        Ok(true)
    }

    fn index_of(&self, cell: &ActorCell) -> Option<usize> {
        self.slots.iter().position(|s| s.cell.as_ref().is_some_and(|c| c.get_id() == cell.get_id()))
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, args: SupervisorArgs) -> Result<SupervisorState, ActorProcessingErr> {
        let policy = args.policy;
        let mut state = SupervisorState {
            name: args.name,
            intensity: Intensity::new(policy.restarts_max, policy.window),
            policy,
            slots: args.children.into_iter().map(|spec| Slot { spec, cell: None, status: Status::Waiting, restarts: 0 }).collect(),
            events: args.events,
            clock: MonoClock::new(),
        };
        for i in 0..state.slots.len() {
            if let Err(e) = state.start_child(&myself, i).await {
                // A child that cannot start at all: stop those started, fail to start.
                state.stop_all().await;
                return Err(format!("{}: child {} failed to start: {e}", state.name, state.slots[i].spec.name).into());
            }
        }
        Ok(state)
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, msg: SupervisorMsg, state: &mut SupervisorState) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Restart => {
                for i in 0..state.slots.len() {
                    if state.slots[i].status != Status::Waiting {
                        continue;
                    }
                    if let Err(e) = state.start_child(&myself, i).await {
                        // A failed start that scheduled another restart: the rest wait for it.
                        // One that did not (the child is not restarted) leaves them to start now.
                        if state.on_exit(&myself, i, true, format!("start failed: {e}")).await? {
                            break;
                        }
                    }
                }
            }
            SupervisorMsg::Shutdown(reply) => {
                state.stop_all().await;
                for s in &mut state.slots {
                    s.status = Status::Stopped;
                }
                let _ = reply.send(());
                myself.stop(Some("shutdown".into()));
            }
            SupervisorMsg::Children(reply) => {
                let info = state
                    .slots
                    .iter()
                    .map(|s| ChildInfo {
                        name: s.spec.name.clone(),
                        state: match s.status {
                            Status::Running => "running",
                            Status::Waiting => "restarting",
                            Status::Stopped => "stopped",
                        },
                        restarts: s.restarts,
                    })
                    .collect();
                let _ = reply.send(info);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(&self, myself: ActorRef<Self::Msg>, event: SupervisionEvent, state: &mut SupervisorState) -> Result<(), ActorProcessingErr> {
        let (cell, failed, reason) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, true, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (cell, false, reason.unwrap_or_else(|| "normal".into())),
            _ => return Ok(()),
        };
        // Children we stopped ourselves, or from an earlier life, are not ours any more.
        let Some(i) = state.index_of(&cell) else { return Ok(()) };
        state.on_exit(&myself, i, failed, reason).await.map(|_| ())
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, state: &mut SupervisorState) -> Result<(), ActorProcessingErr> {
        state.stop_all().await;
        Ok(())
    }
}

/// Asks a supervisor for its children's states (`None` if it is gone or does not answer
/// within `timeout`).
pub async fn children(supervisor: &ActorRef<SupervisorMsg>, timeout: Duration) -> Option<Vec<ChildInfo>> {
    ractor::call_t!(supervisor, SupervisorMsg::Children, timeout.as_millis() as u64).ok()
}

/// Orderly shutdown of a supervision tree: waits at most `timeout`.
pub async fn shutdown(supervisor: &ActorRef<SupervisorMsg>, timeout: Duration) {
    let _ = ractor::call_t!(supervisor, SupervisorMsg::Shutdown, timeout.as_millis() as u64);
}
