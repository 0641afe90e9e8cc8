//! Interest: the table of rooms this node wants (written by the hub through [`Interest`]) and
//! the reconciler task that keeps one NATS subscription, with its reader task, per wanted room
//! (plus the linger), and confirms new subscriptions with a round trip before their rooms go
//! live.
//!
//! Owns the table, the linger queue and the confirmation subject. It starts and stops readers
//! ([`super::reader`]) but does not read messages, and it touches the hub only to mark a plain
//! room live ([`crate::hub::Hub::mark_live`]).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use async_nats::{Client, Subscriber};
use bytes::Bytes;
use futures_util::StreamExt;
use roomcast_protocol::RoomName;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::reader::{Inbound, RoomHandle, read_room, read_sequenced_room};
use crate::{
    cluster::{stream as history, subject},
    hub::Interest,
};

/// Longest wait for the server to confirm new room subscriptions before their `Subscribed`
/// replies go out anyway.
const LIVE_CONFIRM_WAIT: Duration = Duration::from_secs(2);

/// What the node wants for one room.
struct Want {
    /// A local subscriber exists.
    on: bool,
    /// When the room last lost its last local subscriber.
    off_since: Instant,
    /// The room is in `Table::changed`.
    queued: bool,
    /// The room is in the reconciler's linger queue.
    lingering: bool,
}

#[derive(Default)]
struct TableState {
    rooms: HashMap<RoomName, Want>,
    /// Rooms whose `Want` changed since the reconciler last looked (no duplicates).
    changed: Vec<RoomName>,
    /// The readers of sequenced rooms.
    handles: HashMap<RoomName, Arc<RoomHandle>>,
}

/// The interest table the hub writes into.
#[derive(Default)]
pub(super) struct Table {
    state: Mutex<TableState>,
    wake: Notify,
}

impl Table {
    fn set(&self, room: &RoomName, on: bool) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let TableState { rooms, changed, .. } = &mut *state;
        let want = rooms.entry(room.clone()).or_insert(Want {
            on,
            off_since: Instant::now(),
            queued: false,
            lingering: false,
        });
        want.on = on;
        if !on {
            want.off_since = Instant::now();
        }
        if !want.queued {
            want.queued = true;
            changed.push(room.clone());
        }
        drop(state);
        self.wake.notify_one();
    }
}

impl Interest for Table {
    fn interest_on(&self, room: &RoomName) {
        self.set(room, true);
    }
    fn interest_off(&self, room: &RoomName) {
        self.set(room, false);
    }
    fn confirms_live(&self) -> bool {
        true
    }
    fn recovery_requested(&self, room: &RoomName) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // No reader yet: it answers waiting recoveries as soon as it starts.
        if let Some(handle) = state.handles.get(room) {
            handle.poke.notify_one();
        }
    }
}

/// What one look at the table decided.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    /// Wanted rooms without a subscription: subscribe.
    subscribe: Vec<RoomName>,
    /// Rooms wanted again while their subscription lingered: live already.
    live: Vec<RoomName>,
    /// Rooms whose linger ended unwanted: unsubscribe (stop their reader).
    unsubscribe: Vec<RoomName>,
}

impl TableState {
    /// Takes the changes since the last look and the lingers ended by `now` (`lingering`: the
    /// rooms waiting for their linger to end, in deadline order, as `linger` is one constant);
    /// `subscribed` says which rooms have a subscription. Forgets the rooms nobody wants.
    fn plan(
        &mut self,
        subscribed: impl Fn(&RoomName) -> bool,
        lingering: &mut VecDeque<(Instant, RoomName)>,
        linger: Duration,
        now: Instant,
    ) -> Plan {
        let mut plan = Plan::default();
        for room in std::mem::take(&mut self.changed) {
            let Some(want) = self.rooms.get_mut(&room) else {
                continue;
            };
            want.queued = false;
            if want.on {
                if subscribed(&room) {
                    plan.live.push(room);
                } else {
                    plan.subscribe.push(room);
                }
            } else if subscribed(&room) {
                if !want.lingering {
                    want.lingering = true;
                    lingering.push_back((want.off_since + linger, room));
                }
            } else {
                self.rooms.remove(&room);
            }
        }
        // Lingers that ended: unsubscribe unless the room came back meanwhile.
        while let Some((deadline, _)) = lingering.front() {
            if *deadline > now {
                break;
            }
            let Some((_, room)) = lingering.pop_front() else {
                break;
            };
            match self.rooms.get_mut(&room) {
                Some(want) if want.on => want.lingering = false,
                Some(want) if want.off_since + linger > now => {
                    // Left again later than this entry says: wait for the newer deadline.
                    lingering.push_back((want.off_since + linger, room));
                }
                _ => {
                    self.rooms.remove(&room);
                    self.handles.remove(&room);
                    plan.unsubscribe.push(room);
                }
            }
        }
        plan
    }
}

/// Keeps one subscription per room the table wants (plus linger), none for the others.
pub(super) async fn reconcile(
    client: Client,
    table: Arc<Table>,
    inbound: Arc<Inbound>,
    prefix: subject::SubjectPrefix,
    linger: Duration,
    shutdown: CancellationToken,
) {
    // Rooms with a live subscription, with the token that stops their reader.
    let mut active: HashMap<RoomName, CancellationToken> = HashMap::new();
    // Rooms waiting for their linger to end, in deadline order.
    let mut lingering: VecDeque<(Instant, RoomName)> = VecDeque::new();
    // A private subject this node sends itself a message on after new SUBs: the server
    // handles one connection's commands in order, so when the message is back the SUBs are
    // in force on the node's server (async-nats' flush only empties the write buffer).
    let mut confirm = Confirm::new(&client).await;
    loop {
        let plan = table.state.lock().unwrap_or_else(|e| e.into_inner()).plan(
            |room| active.contains_key(room),
            &mut lingering,
            linger,
            Instant::now(),
        );
        for room in &plan.unsubscribe {
            if let Some(stop) = active.remove(room) {
                // The reader stops before any new subscription for the room exists.
                stop.cancel();
                debug!(%room, "NATS interest off");
            }
        }
        for room in &plan.live {
            mark_live(&table, &inbound, room);
        }
        for room in &plan.subscribe {
            let started = tokio::select! {
                started = start_reader(&client, &table, &inbound, &prefix, room, &shutdown) => started,
                () = shutdown.cancelled() => break,
            };
            if let Some(stop) = started {
                active.insert(room.clone(), stop);
            }
        }
        if !plan.subscribe.is_empty() {
            // Once a message sent after the SUBs is back, the node's server routes the rooms'
            // messages here: only then do the waiting `Subscribed` replies go out. While NATS
            // is unreachable the round trip cannot complete; the replies go out after the
            // bound (publishes are refused with `unavailable` meanwhile, and events from other
            // nodes may be missed until the connection is back).
            let confirmed = tokio::select! {
                confirmed = tokio::time::timeout(LIVE_CONFIRM_WAIT, confirm.round_trip(&client)) => confirmed,
                () = shutdown.cancelled() => break,
            };
            if !matches!(confirmed, Ok(true)) {
                warn!(
                    rooms = plan.subscribe.len(),
                    "NATS subscriptions not confirmed in time"
                );
            }
            for room in &plan.subscribe {
                mark_live(&table, &inbound, room);
            }
        }
        inbound.metrics.subscriptions.set(active.len() as i64);
        let next_deadline = lingering.front().map(|(d, _)| *d);
        let sleep = async {
            match next_deadline {
                Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = table.wake.notified() => {}
            () = sleep => {}
            () = shutdown.cancelled() => break,
        }
    }
    for stop in active.values() {
        stop.cancel();
    }
}

/// Subscribes to `room`'s subject (its stream's sequenced subject for a sequenced room) and
/// starts its reader; the token stops the reader (and so unsubscribes). `None` when NATS
/// refused the subscription.
async fn start_reader(
    client: &Client,
    table: &Table,
    inbound: &Arc<Inbound>,
    prefix: &subject::SubjectPrefix,
    room: &RoomName,
    shutdown: &CancellationToken,
) -> Option<CancellationToken> {
    let rule = inbound.rules.rule(room).clone();
    let sequenced = rule.sequenced && !rule.volatile;
    let subject = if sequenced {
        history::sequenced_subject(prefix, room)
    } else {
        subject::subject_for(prefix, room)
    };
    let subscriber = match client.subscribe(subject).await {
        Ok(subscriber) => subscriber,
        Err(e) => {
            warn!(error = %e, %room, "NATS subscribe failed");
            return None;
        }
    };
    debug!(%room, sequenced, "NATS interest on");
    let stop = shutdown.child_token();
    if sequenced {
        let handle = Arc::new(RoomHandle::default());
        table
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .handles
            .insert(room.clone(), handle.clone());
        tokio::spawn(read_sequenced_room(
            room.clone(),
            rule,
            subscriber,
            inbound.clone(),
            handle,
            stop.clone(),
        ));
    } else {
        tokio::spawn(read_room(
            room.clone(),
            subscriber,
            inbound.clone(),
            stop.clone(),
        ));
    }
    Some(stop)
}

/// The room's subscription is in force: plain rooms go live at once; a sequenced room's reader
/// first reads where the room stands in its stream.
fn mark_live(table: &Table, inbound: &Inbound, room: &RoomName) {
    let handle = table
        .state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .handles
        .get(room)
        .cloned();
    match handle {
        Some(handle) => {
            handle.confirmed.store(true, Ordering::Release);
            handle.poke.notify_one();
        }
        None => inbound.hub.mark_live(room),
    }
}

/// A round trip through the node's NATS server on a private subject (see [`reconcile`]).
struct Confirm {
    subject: async_nats::Subject,
    replies: Option<Subscriber>,
    round: u64,
}

impl Confirm {
    async fn new(client: &Client) -> Confirm {
        let subject = async_nats::Subject::from(client.new_inbox());
        let replies = match client.subscribe(subject.clone()).await {
            Ok(replies) => Some(replies),
            Err(e) => {
                warn!(error = %e, "NATS: no confirmation subject; Subscribed replies will not wait");
                None
            }
        };
        Confirm {
            subject,
            replies,
            round: 0,
        }
    }

    /// Sends the next round's message to itself and waits for it (skipping older rounds'
    /// late ones). `false` when it cannot.
    async fn round_trip(&mut self, client: &Client) -> bool {
        let Some(replies) = &mut self.replies else {
            return false;
        };
        self.round += 1;
        let token = Bytes::from(self.round.to_string());
        if client
            .publish(self.subject.clone(), token.clone())
            .await
            .is_err()
            || client.flush().await.is_err()
        {
            return false;
        }
        while let Some(message) = replies.next().await {
            if message.payload == token {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINGER: Duration = Duration::from_secs(10);

    fn room(name: &str) -> RoomName {
        RoomName::new(name).unwrap()
    }

    /// The reconciler's view: the table, the rooms with a subscription, the linger queue.
    #[derive(Default)]
    struct Reconciler {
        table: Table,
        subscribed: Vec<RoomName>,
        lingering: VecDeque<(Instant, RoomName)>,
    }

    impl Reconciler {
        /// One look at the table at `now`, carried out as the reconciler does.
        fn look(&mut self, now: Instant) -> Plan {
            let mut state = self.table.state.lock().unwrap();
            let subscribed = self.subscribed.clone();
            let plan = state.plan(
                |room| subscribed.contains(room),
                &mut self.lingering,
                LINGER,
                now,
            );
            self.subscribed.retain(|r| !plan.unsubscribe.contains(r));
            self.subscribed.extend(plan.subscribe.iter().cloned());
            plan
        }

        fn wants(&self, room: &RoomName) -> bool {
            self.table.state.lock().unwrap().rooms.contains_key(room)
        }
    }

    fn subscribe(rooms: &[&RoomName]) -> Plan {
        Plan {
            subscribe: rooms.iter().map(|r| (*r).clone()).collect(),
            ..Plan::default()
        }
    }

    #[test]
    fn a_wanted_room_is_subscribed_once_and_one_never_subscribed_is_forgotten() {
        let mut reconciler = Reconciler::default();
        let (a, b) = (room("a:1"), room("b:1"));
        reconciler.table.interest_on(&a);
        reconciler.table.interest_on(&a);
        reconciler.table.interest_on(&b);
        let now = Instant::now();
        assert_eq!(reconciler.look(now), subscribe(&[&a, &b]));
        assert_eq!(reconciler.look(now), Plan::default(), "nothing changed");
        // Its subscription failed, then it was left: nothing to linger for.
        reconciler.subscribed.retain(|r| *r != b);
        reconciler.table.interest_off(&b);
        assert_eq!(reconciler.look(now), Plan::default());
        assert!(!reconciler.wants(&b) && reconciler.wants(&a));
        assert!(reconciler.lingering.is_empty());
    }

    #[test]
    fn a_room_left_lingers_for_its_linger_then_is_unsubscribed() {
        let mut reconciler = Reconciler::default();
        let a = room("a:1");
        reconciler.table.interest_on(&a);
        reconciler.look(Instant::now());
        reconciler
            .table
            .state
            .lock()
            .unwrap()
            .handles
            .insert(a.clone(), Arc::default());
        let before = Instant::now();
        reconciler.table.interest_off(&a);
        let after = Instant::now();
        assert_eq!(reconciler.look(after), Plan::default());
        assert_eq!(reconciler.lingering.len(), 1);
        assert_eq!(
            reconciler.look(before + LINGER - Duration::from_millis(1)),
            Plan::default(),
            "still lingering"
        );
        let plan = reconciler.look(after + LINGER);
        assert_eq!(
            plan,
            Plan {
                unsubscribe: vec![a.clone()],
                ..Plan::default()
            }
        );
        assert!(!reconciler.wants(&a));
        assert!(reconciler.table.state.lock().unwrap().handles.is_empty());
        // Wanted again later: a new subscription.
        reconciler.table.interest_on(&a);
        assert_eq!(reconciler.look(after + LINGER), subscribe(&[&a]));
    }

    /// A reconciler whose room `a:1` was subscribed, lost its last subscriber (lingering) and
    /// got one back, each change looked at once.
    fn subscribed_left_and_back() -> (Reconciler, RoomName) {
        let mut reconciler = Reconciler::default();
        let a = room("a:1");
        reconciler.table.interest_on(&a);
        reconciler.look(Instant::now());
        reconciler.table.interest_off(&a);
        reconciler.look(Instant::now());
        reconciler.table.interest_on(&a);
        (reconciler, a)
    }

    #[test]
    fn a_room_back_within_its_linger_is_live_at_once_and_keeps_its_subscription() {
        let (mut reconciler, a) = subscribed_left_and_back();
        let now = Instant::now();
        assert_eq!(
            reconciler.look(now),
            Plan {
                live: vec![a.clone()],
                ..Plan::default()
            }
        );
        assert_eq!(reconciler.look(now + 2 * LINGER), Plan::default());
        assert!(reconciler.lingering.is_empty());
        assert!(reconciler.wants(&a));
    }

    #[test]
    fn a_room_left_again_later_waits_for_its_newer_deadline() {
        let (mut reconciler, a) = subscribed_left_and_back();
        reconciler.look(Instant::now());
        reconciler.table.interest_off(&a);
        // Left the second time 5 s after the first.
        let second = {
            let mut state = reconciler.table.state.lock().unwrap();
            let want = state.rooms.get_mut(&a).unwrap();
            want.off_since += Duration::from_secs(5);
            want.off_since
        };
        assert_eq!(reconciler.look(second), Plan::default());
        assert_eq!(reconciler.lingering.len(), 1, "one entry per room");
        assert_eq!(
            reconciler.look(second + LINGER - Duration::from_secs(1)),
            Plan::default(),
            "the first deadline passed, the newer one not"
        );
        assert_eq!(
            reconciler.look(second + LINGER).unsubscribe,
            vec![a.clone()]
        );
    }
}
