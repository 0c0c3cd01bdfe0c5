//! Issue #5, acceptance 1: OTP strategies, restart types, intensity and escalation, backoff,
//! orderly shutdown — on real ractor actors (the probe), read off the supervision events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorRef, ActorStatus};
use strata_core::config::{RestartType, Strategy};
use strata_core::supervise::{self, policy::Policy, Event, Supervisor, SupervisorArgs, SupervisorMsg};
use strata_integration::probe::{ProbeMsg, Probes, Recorder};

const WAIT: Duration = Duration::from_secs(10);

fn policy(strategy: Strategy) -> Policy {
    Policy {
        strategy,
        restarts_max: 5,
        window: Duration::from_secs(30),
        backoff_base: Duration::from_millis(1),
        backoff_max: Duration::from_millis(1),
        jitter_pct: 0,
        child_shutdown_timeout: Duration::from_millis(500),
    }
}

async fn start(policy: Policy, probes: &Probes, children: &[(&str, RestartType)], rec: &Recorder) -> ActorRef<SupervisorMsg> {
    let children = children.iter().map(|(n, r)| probes.child(n, *r)).collect();
    let args = SupervisorArgs { name: "sup".into(), policy, children, events: rec.sink() };
    Actor::spawn(None, Supervisor, args).await.expect("supervisor starts").0
}

fn starts(probes: &Probes, names: &[&str]) -> Vec<u64> {
    names.iter().map(|n| probes.starts(n)).collect()
}

/// The children named in RestartScheduled events, in order.
fn restarted(rec: &Recorder) -> Vec<Vec<String>> {
    rec.events()
        .into_iter()
        .filter_map(|(_, e)| match e {
            Event::RestartScheduled { children, .. } => Some(children),
            _ => None,
        })
        .collect()
}

async fn fail_and_wait(probes: &Probes, failing: &str, msg: ProbeMsg, wait_for: &[(&str, u64)]) {
    probes.send(failing, msg);
    for (name, n) in wait_for {
        assert!(probes.wait_starts(name, *n, WAIT).await, "{name} was not started {n} times");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_for_one_restarts_only_the_failed_child() {
    let (probes, rec) = (Probes::default(), Recorder::default());
    let names = ["a", "b", "c"];
    let sup = start(policy(Strategy::OneForOne), &probes, &names.map(|n| (n, RestartType::Permanent)), &rec).await;
    fail_and_wait(&probes, "b", ProbeMsg::Panic, &[("b", 2)]).await;
    assert_eq!(starts(&probes, &names), [1, 2, 1]);
    assert_eq!(restarted(&rec), [vec!["b".to_owned()]]);
    assert!(rec.stopped().is_empty(), "nothing else stopped: {:?}", rec.stopped());
    supervise::shutdown(&sup, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_for_all_restarts_every_child_stopping_the_others_in_reverse_order() {
    let (probes, rec) = (Probes::default(), Recorder::default());
    let names = ["a", "b", "c"];
    let sup = start(policy(Strategy::OneForAll), &probes, &names.map(|n| (n, RestartType::Permanent)), &rec).await;
    fail_and_wait(&probes, "b", ProbeMsg::Fail, &[("a", 2), ("b", 2), ("c", 2)]).await;
    assert_eq!(starts(&probes, &names), [2, 2, 2]);
    assert_eq!(restarted(&rec), [vec!["a".to_owned(), "b".into(), "c".into()]]);
    assert_eq!(rec.stopped(), [("c".to_owned(), false), ("a".to_owned(), false)]);
    supervise::shutdown(&sup, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_for_one_restarts_the_failed_child_and_those_started_after_it() {
    let (probes, rec) = (Probes::default(), Recorder::default());
    let names = ["a", "b", "c", "d"];
    let sup = start(policy(Strategy::RestForOne), &probes, &names.map(|n| (n, RestartType::Permanent)), &rec).await;
    fail_and_wait(&probes, "b", ProbeMsg::Panic, &[("b", 2), ("c", 2), ("d", 2)]).await;
    assert_eq!(starts(&probes, &names), [1, 2, 2, 2]);
    assert_eq!(restarted(&rec), [vec!["b".to_owned(), "c".into(), "d".into()]]);
    assert_eq!(rec.stopped(), [("d".to_owned(), false), ("c".to_owned(), false)]);
    supervise::shutdown(&sup, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_types_decide_what_is_restarted() {
    let (probes, rec) = (Probes::default(), Recorder::default());
    let children =
        [("perm", RestartType::Permanent), ("trans", RestartType::Transient), ("trans-crash", RestartType::Transient), ("temp", RestartType::Temporary)];
    let sup = start(policy(Strategy::OneForOne), &probes, &children, &rec).await;
    // A permanent child is restarted even after a normal exit.
    fail_and_wait(&probes, "perm", ProbeMsg::Exit, &[("perm", 2)]).await;
    // A transient child that exits normally is not restarted...
    probes.send("trans", ProbeMsg::Exit);
    assert!(rec.wait_for(WAIT, |e| matches!(e, Event::ChildExited { child, failed: false, .. } if child == "trans")).await);
    // ...but one that crashes is.
    fail_and_wait(&probes, "trans-crash", ProbeMsg::Panic, &[("trans-crash", 2)]).await;
    // A temporary child is never restarted.
    probes.send("temp", ProbeMsg::Panic);
    assert!(rec.wait_for(WAIT, |e| matches!(e, Event::ChildExited { child, failed: true, .. } if child == "temp")).await);
    // Give a wrong restart every chance to happen (the backoff is 1 ms).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(starts(&probes, &["perm", "trans", "trans-crash", "temp"]), [2, 1, 2, 1]);
    let states: Vec<(String, &str)> = supervise::children(&sup, Duration::from_secs(30)).await.unwrap().into_iter().map(|c| (c.name, c.state)).collect();
    assert_eq!(states, [("perm".into(), "running"), ("trans".into(), "stopped"), ("trans-crash".into(), "running"), ("temp".into(), "stopped")]);
    supervise::shutdown(&sup, WAIT).await;
}

/// A temporary child that a sibling's failure stops (one_for_all, rest_for_one) is not
/// started again: temporary means never restarted, as in OTP. It used to be restarted with
/// the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temporary_child_stopped_for_a_sibling_is_not_restarted() {
    for strategy in [Strategy::OneForAll, Strategy::RestForOne] {
        let (probes, rec) = (Probes::default(), Recorder::default());
        let children = [("a", RestartType::Permanent), ("t", RestartType::Temporary), ("c", RestartType::Permanent)];
        let sup = start(policy(strategy), &probes, &children, &rec).await;
        fail_and_wait(&probes, "a", ProbeMsg::Fail, &[("a", 2), ("c", 2)]).await;
        assert_eq!(starts(&probes, &["a", "t", "c"]), [2, 1, 2], "{strategy:?}");
        assert_eq!(restarted(&rec), [vec!["a".to_owned(), "c".into()]], "{strategy:?}");
        let states: Vec<(String, &str)> = supervise::children(&sup, WAIT).await.unwrap().into_iter().map(|c| (c.name, c.state)).collect();
        assert_eq!(states, [("a".into(), "running"), ("t".into(), "stopped"), ("c".into(), "running")], "{strategy:?}");
        supervise::shutdown(&sup, WAIT).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failure_past_the_intensity_escalates_to_the_parent() {
    let (probes, rec) = (Probes::default(), Recorder::default());
    // An inner supervisor (3 restarts in 30 s) under an outer one that restarts it.
    let inner_probes = probes.clone();
    let inner_rec = rec.clone();
    let make_inner = Arc::new(move || SupervisorArgs {
        name: "inner".into(),
        policy: Policy { restarts_max: 3, ..policy(Strategy::OneForOne) },
        children: ["a", "b", "c"].iter().map(|n| inner_probes.child(n, RestartType::Permanent)).collect(),
        events: inner_rec.sink(),
    });
    let args = SupervisorArgs {
        name: "outer".into(),
        policy: policy(Strategy::OneForOne),
        children: vec![Supervisor::child_spec(make_inner, RestartType::Permanent)],
        events: rec.sink(),
    };
    let outer = Actor::spawn(None, Supervisor, args).await.unwrap().0;
    for n in 2..=4 {
        fail_and_wait(&probes, "b", ProbeMsg::Panic, &[("b", n)]).await;
    }
    assert_eq!(starts(&probes, &["a", "b", "c"]), [1, 4, 1], "three restarts within the intensity");
    assert!(!rec.events().iter().any(|(_, e)| matches!(e, Event::Escalated { .. })));
    rec.clear();
    // The 4th failure in the window: the inner supervisor stops c, b?, a in reverse order and
    // fails; the outer one restarts it, which starts all three again.
    fail_and_wait(&probes, "b", ProbeMsg::Panic, &[("a", 2), ("b", 5), ("c", 2)]).await;
    let events: Vec<Event> = rec.events().into_iter().map(|(_, e)| e).collect();
    let escalated = events.iter().position(|e| matches!(e, Event::Escalated { supervisor, .. } if supervisor == "inner"));
    let escalated = escalated.unwrap_or_else(|| panic!("no escalation in {events:?}"));
    assert_eq!(rec.stopped()[..2], [("c".to_owned(), false), ("a".to_owned(), false)], "reverse start order");
    let outer_saw =
        events.iter().position(|e| matches!(e, Event::ChildExited { supervisor, child, failed: true, .. } if supervisor == "outer" && child == "inner"));
    assert!(outer_saw.is_some_and(|i| i > escalated), "the outer supervisor saw the inner one fail: {events:?}");
    supervise::shutdown(&outer, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_past_its_intensity_stops_and_fails() {
    let (probes, rec) = (Probes::default(), Recorder::default());
    let p = Policy { restarts_max: 1, ..policy(Strategy::OneForOne) };
    let children = [("a", RestartType::Permanent), ("b", RestartType::Permanent)];
    let children = children.iter().map(|(n, r)| probes.child(n, *r)).collect();
    let (sup, handle) = Actor::spawn(None, Supervisor, SupervisorArgs { name: "root".into(), policy: p, children, events: rec.sink() }).await.unwrap();
    fail_and_wait(&probes, "a", ProbeMsg::Panic, &[("a", 2)]).await;
    probes.send("a", ProbeMsg::Panic);
    tokio::time::timeout(WAIT, handle).await.expect("the root ends").expect("no panic");
    assert_eq!(sup.get_status(), ActorStatus::Stopped);
    assert_eq!(rec.stopped(), [("b".to_owned(), false)]);
    assert!(rec.events().iter().any(|(_, e)| matches!(e, Event::Escalated { reason, .. } if reason.contains("more than 1 restarts"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successive_restarts_are_spaced_by_the_backoff() {
    let (probes, rec) = (Probes::default(), Recorder::default());
    let p = Policy { restarts_max: 10, backoff_base: Duration::from_millis(100), backoff_max: Duration::from_millis(400), ..policy(Strategy::OneForOne) };
    let sup = start(p, &probes, &[("a", RestartType::Permanent)], &rec).await;
    for n in 2..=5 {
        fail_and_wait(&probes, "a", ProbeMsg::Panic, &[("a", n)]).await;
    }
    let events = rec.events();
    let exits = events.iter().filter(|(_, e)| matches!(e, Event::ChildExited { .. })).map(|(t, _)| *t);
    let starts = events.iter().filter(|(_, e)| matches!(e, Event::ChildStarted { restarts, .. } if *restarts > 0)).map(|(t, _)| *t);
    let gaps: Vec<Duration> = exits.zip(starts).map(|(exit, start)| start - exit).collect();
    report!("restart gaps: {gaps:?} (configured 100, 200, 400, 400 ms)");
    for (gap, want) in gaps.iter().zip([100, 200, 400, 400]) {
        let want = Duration::from_millis(want);
        assert!(*gap >= want && *gap < want + Duration::from_millis(500), "gap {gap:?}, configured {want:?}");
    }
    assert_eq!(gaps.len(), 4);
    supervise::shutdown(&sup, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_children_in_reverse_order_and_kills_a_hung_one() {
    let (probes, rec) = (Probes::default(), Recorder::default());
    let names = ["a", "b", "c"];
    let sup = start(policy(Strategy::OneForOne), &probes, &names.map(|n| (n, RestartType::Permanent)), &rec).await;
    probes.send("b", ProbeMsg::Hang(Duration::from_secs(3600)));
    assert!(probes.wait_hanging("b", WAIT).await);
    let t0 = Instant::now();
    supervise::shutdown(&sup, WAIT).await;
    let took = t0.elapsed();
    assert_eq!(rec.stopped(), [("c".to_owned(), false), ("b".to_owned(), true), ("a".to_owned(), false)]);
    assert!(took >= Duration::from_millis(500) && took < WAIT, "the hung child got its 500 ms, then was killed ({took:?})");
    assert_eq!(starts(&probes, &names), [1, 1, 1], "nothing restarted during shutdown");
}
