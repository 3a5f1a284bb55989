//! The leader's in-memory view of the fleet, and the admission decision made from it.
//!
//! Admission reads only memory, so deciding where a job goes costs no database round trip. The
//! view has two sources:
//! - robots (class, slots, state, online) from registrations and the heartbeat bucket;
//! - the leader's own bookkeeping of what it committed: which jobs run on which robot (claims,
//!   completions, releases) and how many offers wait unclaimed on each subject. Heartbeats lag,
//!   the leader's own writes do not, so capacity comes from the latter. A periodic reload from
//!   PostgreSQL corrects any drift (and rebuilds the view when an instance becomes leader).
//!
//! **Capacity.** A class can take a new offer while its unclaimed offers are fewer than its free
//! slots (sum over its online robots of `max_jobs - running`) plus `prefetch`. So at most
//! `prefetch` offers wait ahead of the priority order: every other job waits as `pending`, and
//! the admission pass hands each freed slot to the highest-priority, oldest job that fits.
//!
//! **Strict priority despite prefetch.** A class consumer delivers in stream order, so its
//! unclaimed offers must always be the head of the priority order of what it could serve:
//! - a job waiting for a class that holds offers of a lower priority makes the leader recall
//!   them (the sweeper), so it is offered ahead of them and they are offered again behind it;
//!   [`FleetView::outranked`] tells cheaply (from the lowest priority offered per subject)
//!   when that is worth a look at the database;
//! - in the admission pass, a class an earlier (higher) job waits for takes no offers of later
//!   jobs, prefetch included, so what it holds never sinks below a waiting job;
//! - a job more than one class could serve gets no prefetch: parked on one class's subject, it
//!   would watch a slot free in the other class go to a lower job. It waits `pending` and takes
//!   the first slot that frees in any of them. This costs a round trip per such job when its
//!   classes are full (fleet-bench `routing`, all jobs of one priority: submit → start p50 11.6
//!   → 127 ms); applying it only when a lower-priority job is waiting or offered would avoid that.
//!
//! **Choice.** Among eligible classes with capacity: best fit first (fewest capabilities beyond
//! what the job needs, so browser jobs do not fill GPU robots while browser robots have room),
//! then the most free slots. Within a class the robots' prioritized pulls pick the least busy.
//! A job that some robot rejected is offered to one robot at a time on that robot's own subject,
//! so it never returns to a robot that rejected it.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;
use std::time::Instant;

use fleet_schemas::robot::{Heartbeat, RobotRunState};
use fleet_schemas::{Class, JobId, RobotId, SessionId, TenantId, subjects};

/// What the leader knows of one robot.
#[derive(Debug, Clone)]
pub struct RobotEntry {
    pub class: Class,
    pub max_jobs: u32,
    /// Jobs the leader recorded as running on this robot.
    pub running: HashSet<JobId>,
    pub state: RobotRunState,
    pub session: SessionId,
    pub online: bool,
    pub last_seen: Instant,
}

impl RobotEntry {
    fn new(class: Class, max_jobs: u32, session: SessionId) -> Self {
        Self {
            class,
            max_jobs,
            running: HashSet::new(),
            state: RobotRunState::Online,
            session,
            online: false,
            last_seen: Instant::now(),
        }
    }

    fn takes_work(&self) -> bool {
        self.online && self.state == RobotRunState::Online
    }

    fn free_slots(&self) -> u32 {
        self.max_jobs.saturating_sub(self.running.len() as u32)
    }
}

#[derive(Debug, Default)]
struct TenantView {
    robots: HashMap<RobotId, RobotEntry>,
    /// Unclaimed offers per subject (class or robot subject).
    offered: HashMap<String, u32>,
    /// Per subject: no unclaimed offer there has a lower priority than this (it may be lower
    /// than the lowest one left, since claims do not raise it; reloads and recall checks do).
    lowest: HashMap<String, i16>,
    /// Per class: jobs waiting for its capacity, so a new submission does not jump ahead of
    /// them. Rebuilt by every admission pass.
    blocked: HashMap<Class, u32>,
}

/// What a heartbeat changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeartbeatChange {
    /// Admission should run again.
    pub admission: bool,
    /// The robot's status changed: (from, to).
    pub status: Option<(&'static str, &'static str)>,
}

fn state_name(s: RobotRunState) -> &'static str {
    crate::store::run_state_str(s)
}

/// Where admission sends a job, or why it waits, or why it can never run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Publish the offer on `subject`; `target` names the class or robot for events.
    Offer {
        subject: String,
        target: String,
        class: Option<Class>,
        robot: Option<RobotId>,
    },
    Wait {
        reason: String,
    },
    /// Every eligible online robot rejected the job.
    Fail {
        reason: String,
    },
}

/// A job to place.
pub struct Placing<'a> {
    pub tenant: &'a TenantId,
    pub requires: &'a Class,
    pub target: Option<&'a RobotId>,
    /// Robots that rejected the job, with their reasons.
    pub rejected: &'a [(String, String)],
}

pub struct FleetView {
    prefetch: u32,
    tenants: RwLock<HashMap<TenantId, TenantView>>,
    /// What the keys of bound robots grant (absent: not bound). A heartbeat says what the robot
    /// offers; only the granted part of it counts (attested capabilities).
    grants: RwLock<HashMap<(TenantId, RobotId), Grant>>,
    /// Robots whose connection the server saw present a verified client certificate: they, and
    /// only they, have `tls` (a heartbeat's own `tls` never counts).
    tls: RwLock<std::collections::HashSet<(TenantId, RobotId)>>,
}

/// What a robot's key lets it claim, as the fleet view applies it to its heartbeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Not bound to a key: what it offers.
    Unbound,
    /// Bound to a key that does not restrict: what it offers (claims are still checked).
    Any,
    /// Bound to a key granting these.
    Only(Class),
    /// Its key was revoked: its heartbeats are ignored, it stays offline.
    Revoked,
}

impl Grant {
    /// The grant of a live key (`None`: not restricted).
    pub fn of(granted: Option<&[fleet_schemas::Capability]>) -> Grant {
        match granted {
            None => Grant::Any,
            Some(g) => Grant::Only(Class::new(g.iter().cloned()).unwrap_or_default()),
        }
    }
}

/// What the database says is in flight, to rebuild the bookkeeping from.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// (tenant, robot, job) of running jobs.
    pub running: Vec<(String, String, JobId)>,
    /// (tenant, subject, count) of queued jobs.
    pub offered: Vec<(String, String, i64)>,
    /// (tenant, subject, lowest priority) of queued jobs.
    pub lowest: Vec<(String, String, i16)>,
}

impl FleetView {
    pub fn new(prefetch: u32) -> Self {
        Self {
            prefetch,
            tenants: RwLock::new(HashMap::new()),
            grants: RwLock::new(HashMap::new()),
            tls: RwLock::new(Default::default()),
        }
    }

    /// Record whether the server attested `tls` for the robot's current connection.
    pub fn set_tls(&self, tenant: &TenantId, robot: &RobotId, attested: bool) {
        let mut tls = self.tls.write().expect("not poisoned");
        let key = (tenant.clone(), robot.clone());
        if attested {
            tls.insert(key);
        } else {
            tls.remove(&key);
        }
    }

    /// Record what a robot's key grants (at registration, at revocation, at a reload).
    pub fn set_grant(&self, tenant: &TenantId, robot: &RobotId, grant: Grant) {
        let mut grants = self.grants.write().expect("not poisoned");
        let key = (tenant.clone(), robot.clone());
        if grant == Grant::Unbound {
            grants.remove(&key);
        } else {
            grants.insert(key, grant);
        }
    }

    /// Replace every grant with what the database says (a reload).
    pub fn replace_grants(&self, all: HashMap<(TenantId, RobotId), Grant>) {
        *self.grants.write().expect("not poisoned") = all;
    }

    /// Is the robot bound to a key (so its claims are checked against its effective set)?
    pub fn is_bound(&self, tenant: &TenantId, robot: &RobotId) -> bool {
        self.grants.read().expect("not poisoned").contains_key(&(tenant.clone(), robot.clone()))
    }

    /// Cut a heartbeat's capabilities to what the robot's key grants. `false`: the robot's key
    /// was revoked and the heartbeat must be ignored.
    pub fn attest_heartbeat(&self, hb: &mut Heartbeat) -> bool {
        let tls = fleet_schemas::ids::TLS_CAPABILITY;
        hb.capabilities.retain(|c| c != tls);
        if self.tls.read().expect("not poisoned").contains(&(hb.tenant.clone(), hb.robot_id.clone())) {
            hb.capabilities.push(tls.to_owned());
            hb.capabilities.sort();
        }
        let grants = self.grants.read().expect("not poisoned");
        match grants.get(&(hb.tenant.clone(), hb.robot_id.clone())) {
            None | Some(Grant::Unbound) | Some(Grant::Any) => true,
            Some(Grant::Revoked) => false,
            Some(Grant::Only(granted)) => {
                hb.capabilities.retain(|c| granted.contains(c));
                true
            }
        }
    }

    pub fn clear(&self) {
        self.tenants.write().expect("not poisoned").clear();
    }

    /// Replace the bookkeeping with what the database says (robots are kept).
    pub fn reload(&self, snap: &Snapshot) {
        let mut tenants = self.tenants.write().expect("not poisoned");
        for view in tenants.values_mut() {
            view.offered.clear();
            view.lowest.clear();
            for robot in view.robots.values_mut() {
                robot.running.clear();
            }
        }
        for (tenant, robot, job) in &snap.running {
            let (Ok(t), Ok(r)) = (TenantId::new(tenant.as_str()), RobotId::new(robot.as_str())) else {
                continue;
            };
            if let Some(e) = tenants.get_mut(&t).and_then(|v| v.robots.get_mut(&r)) {
                e.running.insert(*job);
            }
        }
        for (tenant, subject, n) in &snap.offered {
            let Ok(t) = TenantId::new(tenant.as_str()) else { continue };
            tenants.entry(t).or_default().offered.insert(subject.clone(), *n as u32);
        }
        for (tenant, subject, priority) in &snap.lowest {
            let Ok(t) = TenantId::new(tenant.as_str()) else { continue };
            tenants.entry(t).or_default().lowest.insert(subject.clone(), *priority);
        }
    }

    /// A robot registered (or re-registered with a new session).
    pub fn register(
        &self,
        tenant: &TenantId,
        robot: &RobotId,
        class: Class,
        max_jobs: u32,
        session: SessionId,
    ) {
        let mut tenants = self.tenants.write().expect("not poisoned");
        let view = tenants.entry(tenant.clone()).or_default();
        let entry = view
            .robots
            .entry(robot.clone())
            .or_insert_with(|| RobotEntry::new(class.clone(), max_jobs, session));
        if entry.session != session {
            // The jobs of the old session were expired by the caller.
            entry.running.clear();
        }
        entry.class = class;
        entry.max_jobs = max_jobs;
        entry.session = session;
        entry.online = true;
        entry.state = RobotRunState::Online;
        entry.last_seen = Instant::now();
    }

    /// A heartbeat arrived. Says whether something admission cares about changed (the robot
    /// came online, changed state, class or slots) and, when its status changed, from what.
    pub fn heartbeat(&self, hb: &Heartbeat) -> HeartbeatChange {
        let class = match Class::parse(&hb.capabilities) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(robot = %hb.robot_id, error = %e, "heartbeat with invalid capabilities ignored");
                return HeartbeatChange::default();
            }
        };
        let mut tenants = self.tenants.write().expect("not poisoned");
        let view = tenants.entry(hb.tenant.clone()).or_default();
        let known = view.robots.contains_key(&hb.robot_id);
        let entry = view
            .robots
            .entry(hb.robot_id.clone())
            .or_insert_with(|| RobotEntry::new(class.clone(), hb.max_jobs, hb.session_id));
        let before = match (known, entry.online) {
            (false, _) => None,
            (true, true) => Some(state_name(entry.state)),
            (true, false) => Some("offline"),
        };
        let status = before.filter(|b| *b != state_name(hb.state)).map(|b| (b, state_name(hb.state)));
        let changed =
            !entry.online || entry.state != hb.state || entry.class != class || entry.max_jobs != hb.max_jobs;
        entry.class = class;
        entry.max_jobs = hb.max_jobs;
        entry.state = hb.state;
        entry.session = hb.session_id;
        entry.online = true;
        entry.last_seen = Instant::now();
        HeartbeatChange { admission: changed, status }
    }

    /// The robot's heartbeat expired. Returns true when it was online.
    pub fn offline(&self, tenant: &TenantId, robot: &RobotId) -> bool {
        let mut tenants = self.tenants.write().expect("not poisoned");
        match tenants.get_mut(tenant).and_then(|v| v.robots.get_mut(robot)) {
            Some(e) if e.online => {
                e.online = false;
                true
            }
            _ => false,
        }
    }

    /// Robots not heard from within `timeout` (a backstop for a missed expiry marker).
    pub fn stale(&self, timeout: std::time::Duration) -> Vec<(TenantId, RobotId)> {
        let tenants = self.tenants.read().expect("not poisoned");
        tenants
            .iter()
            .flat_map(|(t, view)| {
                view.robots
                    .iter()
                    .filter(|(_, e)| e.online && e.last_seen.elapsed() > timeout)
                    .map(move |(r, _)| (t.clone(), r.clone()))
            })
            .collect()
    }

    /// Online robots with their classes: the consumers the fabric needs follow from these.
    pub fn online_robots(&self) -> Vec<(TenantId, RobotId, Class)> {
        let tenants = self.tenants.read().expect("not poisoned");
        tenants
            .iter()
            .flat_map(|(t, view)| {
                view.robots
                    .iter()
                    .filter(|(_, e)| e.online)
                    .map(move |(r, e)| (t.clone(), r.clone(), e.class.clone()))
            })
            .collect()
    }

    /// Count every online robot as heard from now. The heartbeat bucket was recreated: the
    /// robots' silence while it was missing says nothing about them, and their next beat lands
    /// in the new bucket within an interval.
    pub fn touch_online(&self) {
        let mut tenants = self.tenants.write().expect("not poisoned");
        for e in tenants.values_mut().flat_map(|v| v.robots.values_mut()).filter(|e| e.online) {
            e.last_seen = Instant::now();
        }
    }

    pub fn is_online(&self, tenant: &TenantId, robot: &RobotId) -> bool {
        self.with_robot(tenant, robot, |e| e.online).unwrap_or(false)
    }

    fn with_robot<T>(
        &self,
        tenant: &TenantId,
        robot: &RobotId,
        f: impl FnOnce(&RobotEntry) -> T,
    ) -> Option<T> {
        self.tenants.read().expect("not poisoned").get(tenant).and_then(|v| v.robots.get(robot)).map(f)
    }

    // ----- bookkeeping of the leader's own writes ---------------------------------------------

    /// An offer was committed on `subject`.
    pub fn offered(&self, tenant: &TenantId, subject: &str) {
        let mut tenants = self.tenants.write().expect("not poisoned");
        *tenants.entry(tenant.clone()).or_default().offered.entry(subject.to_owned()).or_default() += 1;
    }

    /// An offer on `subject` is no longer waiting (claimed, recalled, rejected, cancelled).
    pub fn unoffered(&self, tenant: &TenantId, subject: &str) {
        let mut tenants = self.tenants.write().expect("not poisoned");
        if let Some(view) = tenants.get_mut(tenant)
            && let Some(n) = view.offered.get_mut(subject)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                view.lowest.remove(subject);
            }
        }
    }

    /// The offer just reserved on `subject` has `priority` (for [`FleetView::outranked`]).
    pub fn offered_priority(&self, tenant: &TenantId, subject: &str, priority: i16) {
        let mut tenants = self.tenants.write().expect("not poisoned");
        let lowest =
            tenants.entry(tenant.clone()).or_default().lowest.entry(subject.to_owned()).or_insert(priority);
        *lowest = (*lowest).min(priority);
    }

    /// What the database says is the lowest priority offered on `subject` now (`None`: no
    /// offer left there).
    pub fn set_lowest(&self, tenant: &TenantId, subject: &str, priority: Option<i16>) {
        let mut tenants = self.tenants.write().expect("not poisoned");
        let view = tenants.entry(tenant.clone()).or_default();
        match priority {
            Some(p) => view.lowest.insert(subject.to_owned(), p),
            None => view.lowest.remove(subject),
        };
    }

    /// Class subjects a job of `priority` needing `requires` could run on that may hold
    /// unclaimed offers of a lower priority (which it should not wait behind).
    pub fn outranked(&self, tenant: &TenantId, requires: &Class, priority: i16) -> Vec<String> {
        let tenants = self.tenants.read().expect("not poisoned");
        let Some(view) = tenants.get(tenant) else { return Vec::new() };
        let classes: HashSet<&Class> = view
            .robots
            .values()
            .filter(|e| e.takes_work() && e.class.is_superset(requires))
            .map(|e| &e.class)
            .collect();
        classes
            .into_iter()
            .map(|class| subjects::class_offers(tenant, class))
            .filter(|subject| {
                view.offered.get(subject).is_some_and(|n| *n > 0)
                    && view.lowest.get(subject).is_some_and(|lowest| *lowest < priority)
            })
            .collect()
    }

    /// A claim was committed.
    pub fn started(&self, tenant: &TenantId, robot: &RobotId, job: JobId) {
        let mut tenants = self.tenants.write().expect("not poisoned");
        if let Some(e) = tenants.get_mut(tenant).and_then(|v| v.robots.get_mut(robot)) {
            e.running.insert(job);
        }
    }

    /// A running job ended or went back to pending.
    pub fn ended(&self, tenant: &TenantId, robot: &RobotId, job: JobId) {
        let mut tenants = self.tenants.write().expect("not poisoned");
        if let Some(e) = tenants.get_mut(tenant).and_then(|v| v.robots.get_mut(robot)) {
            e.running.remove(&job);
        }
    }

    /// Jobs already waiting for a class that could serve `requires` (for a new job's position).
    pub fn waiting_ahead(&self, tenant: &TenantId, requires: &Class) -> u32 {
        let tenants = self.tenants.read().expect("not poisoned");
        let Some(view) = tenants.get(tenant) else { return 0 };
        view.blocked
            .iter()
            .filter(|(class, _)| class.is_superset(requires))
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0)
    }

    // ----- decisions ----------------------------------------------------------------------

    /// Decide where a job goes and, for an offer, reserve its place (count it as offered), so
    /// concurrent decisions never hand out more than the capacity. A caller whose write then
    /// fails must call [`FleetView::unoffered`]. `position` is the job's place among the
    /// tenant's waiting jobs (for the waiting reason); with `queue_behind`, a job does not take
    /// a class's room while jobs ahead of it wait for that class (the admission pass counts them
    /// anew as it walks the waiting jobs in order; a new submission sees the last pass's count).
    pub fn reserve(&self, job: &Placing<'_>, position: u32, queue_behind: bool) -> Decision {
        let mut tenants = self.tenants.write().expect("not poisoned");
        let view = tenants.entry(job.tenant.clone()).or_default();
        let decision = self.decide(view, job, position, queue_behind);
        match &decision {
            Decision::Offer { subject, .. } => *view.offered.entry(subject.clone()).or_default() += 1,
            Decision::Wait { .. } if job.target.is_none() && job.rejected.is_empty() => {
                // Waiting behind capacity (or for a robot at all): later submissions that
                // these classes could serve queue behind it.
                for e in view.robots.values() {
                    if e.takes_work() && e.class.is_superset(job.requires) {
                        *view.blocked.entry(e.class.clone()).or_default() += 1;
                    }
                }
            }
            _ => {}
        }
        decision
    }

    /// Could any pending job be offered now? False when every robot taking work has its class's
    /// (and its own) offers at the limit: an admission round would only read jobs to leave
    /// them waiting.
    pub fn has_room(&self) -> bool {
        let tenants = self.tenants.read().expect("not poisoned");
        tenants.iter().any(|(tenant, view)| {
            let mut free: HashMap<&Class, u32> = HashMap::new();
            for e in view.robots.values().filter(|e| e.takes_work()) {
                *free.entry(&e.class).or_default() += e.free_slots();
            }
            let class_room = free.iter().any(|(class, free)| {
                let waiting = view.offered.get(&subjects::class_offers(tenant, class)).copied().unwrap_or(0);
                waiting < free + self.prefetch
            });
            // A robot's own subject (targeted and rejected jobs) counts while the robot has a
            // free slot; its prefetch waits for the next pass.
            class_room
                || view.robots.iter().filter(|(_, e)| e.takes_work()).any(|(robot, e)| {
                    let waiting =
                        view.offered.get(&subjects::robot_offers(tenant, robot)).copied().unwrap_or(0);
                    waiting < e.free_slots()
                })
        })
    }

    /// Start of an admission pass: forget who was blocked; the pass records it anew.
    pub fn begin_pass(&self) {
        for view in self.tenants.write().expect("not poisoned").values_mut() {
            view.blocked.clear();
        }
    }

    fn decide(&self, view: &TenantView, job: &Placing<'_>, position: u32, queue_behind: bool) -> Decision {
        if let Some(target) = job.target {
            return self.decide_target(view, job, target);
        }
        let eligible: Vec<(&RobotId, &RobotEntry)> =
            view.robots.iter().filter(|(_, e)| e.takes_work() && e.class.is_superset(job.requires)).collect();
        if eligible.is_empty() {
            let online_incapable =
                view.robots.values().any(|e| e.online && e.class.is_superset(job.requires));
            return Decision::Wait {
                reason: match (online_incapable, job.requires.is_empty()) {
                    (true, _) => format!(
                        "every online robot of tenant {} that has capabilities {} is paused or draining",
                        job.tenant,
                        job.requires.name()
                    ),
                    (false, true) => format!("no online robot of tenant {}", job.tenant),
                    (false, false) => {
                        format!(
                            "no online robot of tenant {} has capabilities {}",
                            job.tenant,
                            job.requires.name()
                        )
                    }
                },
            };
        }
        if !job.rejected.is_empty() {
            return self.decide_after_rejection(view, job, &eligible);
        }
        // class -> free slots, robots
        let mut classes: HashMap<&Class, (u32, u32)> = HashMap::new();
        for (_, e) in &eligible {
            let c = classes.entry(&e.class).or_default();
            c.0 += e.free_slots();
            c.1 += 1;
        }
        // Prefetch only where the job cannot be outranked by a slot freeing elsewhere (module docs).
        let prefetch = if classes.len() > 1 { 0 } else { self.prefetch };
        let best = classes
            .iter()
            .filter(|(class, (free, _))| {
                let waiting =
                    view.offered.get(&subjects::class_offers(job.tenant, class)).copied().unwrap_or(0);
                let queued_behind = queue_behind && view.blocked.get(**class).copied().unwrap_or(0) > 0;
                waiting < free + prefetch && !queued_behind
            })
            .min_by(|a, b| {
                let extra_a = a.0.len() - job.requires.len();
                let extra_b = b.0.len() - job.requires.len();
                extra_a.cmp(&extra_b).then(b.1.0.cmp(&a.1.0)).then(a.0.name().cmp(&b.0.name()))
            });
        match best {
            Some((class, _)) => Decision::Offer {
                subject: subjects::class_offers(job.tenant, class),
                target: format!("class {}", class.name()),
                class: Some((*class).clone()),
                robot: None,
            },
            None => Decision::Wait {
                reason: format!(
                    "all {} eligible robot{} busy (position {position} in queue)",
                    eligible.len(),
                    if eligible.len() == 1 { "" } else { "s" }
                ),
            },
        }
    }

    fn decide_target(&self, view: &TenantView, job: &Placing<'_>, target: &RobotId) -> Decision {
        let Some(e) = view.robots.get(target) else {
            return Decision::Wait { reason: format!("target robot {target} is offline") };
        };
        if !e.online {
            return Decision::Wait { reason: format!("target robot {target} is offline") };
        }
        if !e.class.is_superset(job.requires) {
            let missing: Vec<String> = job
                .requires
                .iter()
                .filter(|c| !e.class.contains(c.as_str()))
                .map(|c| c.to_string())
                .collect();
            return Decision::Wait {
                reason: format!("target robot {target} lacks capabilities {}", missing.join("+")),
            };
        }
        if job.rejected.iter().any(|(r, _)| r == target.as_str()) {
            return Decision::Fail { reason: rejection_summary(job.rejected) };
        }
        if !e.takes_work() {
            return Decision::Wait {
                reason: format!("target robot {target} is not taking work (paused or draining)"),
            };
        }
        let subject = subjects::robot_offers(job.tenant, target);
        let waiting = view.offered.get(&subject).copied().unwrap_or(0);
        if waiting >= e.free_slots() + self.prefetch {
            return Decision::Wait { reason: format!("target robot {target} is busy") };
        }
        Decision::Offer {
            subject,
            target: format!("robot {target}"),
            class: None,
            robot: Some(target.clone()),
        }
    }

    /// A rejected job goes to one robot that has not rejected it, on that robot's own subject.
    fn decide_after_rejection(
        &self,
        view: &TenantView,
        job: &Placing<'_>,
        eligible: &[(&RobotId, &RobotEntry)],
    ) -> Decision {
        let rejected: HashSet<&str> = job.rejected.iter().map(|(r, _)| r.as_str()).collect();
        let candidates: Vec<&(&RobotId, &RobotEntry)> =
            eligible.iter().filter(|(r, _)| !rejected.contains(r.as_str())).collect();
        if candidates.is_empty() {
            return Decision::Fail { reason: rejection_summary(job.rejected) };
        }
        let best = candidates
            .iter()
            .filter(|(r, e)| {
                // No prefetch here: the job goes to one robot that has a slot now.
                let waiting = view.offered.get(&subjects::robot_offers(job.tenant, r)).copied().unwrap_or(0);
                waiting < e.free_slots()
            })
            .min_by(|(ra, a), (rb, b)| {
                let extra_a = a.class.len() - job.requires.len();
                let extra_b = b.class.len() - job.requires.len();
                extra_a.cmp(&extra_b).then(b.free_slots().cmp(&a.free_slots())).then(ra.cmp(rb))
            });
        match best {
            Some((robot, _)) => Decision::Offer {
                subject: subjects::robot_offers(job.tenant, robot),
                target: format!("robot {robot}"),
                class: None,
                robot: Some((*robot).clone()),
            },
            None => Decision::Wait {
                reason: format!(
                    "waiting for one of {} robot{} that have not rejected it",
                    candidates.len(),
                    if candidates.len() == 1 { "" } else { "s" }
                ),
            },
        }
    }

    /// Per class of a tenant: online robots, total slots, running jobs, unclaimed offers.
    pub fn classes(&self, tenant: &TenantId) -> Vec<ClassLoad> {
        let tenants = self.tenants.read().expect("not poisoned");
        let Some(view) = tenants.get(tenant) else { return Vec::new() };
        let mut loads: HashMap<&Class, ClassLoad> = HashMap::new();
        for e in view.robots.values() {
            let load = loads.entry(&e.class).or_insert_with(|| ClassLoad {
                class: e.class.clone(),
                offered: view.offered.get(&subjects::class_offers(tenant, &e.class)).copied().unwrap_or(0),
                ..ClassLoad::default()
            });
            load.robots += 1;
            if e.online {
                load.online_robots += 1;
                load.capacity += e.max_jobs;
            }
            load.running += e.running.len() as u32;
        }
        let mut out: Vec<ClassLoad> = loads.into_values().collect();
        out.sort_by_key(|l| l.class.name());
        out
    }
}

/// Load of one class, for `GET /api/v1/queues`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClassLoad {
    pub class: Class,
    pub robots: u32,
    pub online_robots: u32,
    pub capacity: u32,
    pub running: u32,
    pub offered: u32,
}

/// "rejected by every robot it was offered to: r1 (draining), r2 (runner missing)".
pub fn rejection_summary(rejected: &[(String, String)]) -> String {
    let list: Vec<String> = rejected.iter().map(|(r, why)| format!("{r} ({why})")).collect();
    format!("rejected by every eligible robot: {}", list.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> TenantId {
        TenantId::new("acme").unwrap()
    }

    fn add(view: &FleetView, id: &str, caps: &[&str], max: u32) {
        view.register(&t(), &RobotId::new(id).unwrap(), Class::parse(caps).unwrap(), max, SessionId::new());
    }

    fn place<'a>(tenant: &'a TenantId, requires: &'a Class) -> Placing<'a> {
        Placing { tenant, requires, target: None, rejected: &[] }
    }

    fn subject_of(d: &Decision) -> &str {
        match d {
            Decision::Offer { subject, .. } => subject,
            other => panic!("expected an offer, got {other:?}"),
        }
    }

    #[test]
    fn best_fit_then_most_free() {
        let view = FleetView::new(0);
        add(&view, "gpu", &["browser", "gpu", "shell"], 4);
        add(&view, "b1", &["browser", "shell"], 1);
        add(&view, "b2", &["browser", "shell"], 1);
        let (tenant, browser, gpu) =
            (t(), Class::parse(["browser"]).unwrap(), Class::parse(["gpu"]).unwrap());
        let browser_class = "fleet.jobs.acme.browser+shell";
        let gpu_class = "fleet.jobs.acme.browser+gpu+shell";
        assert_eq!(subject_of(&view.reserve(&place(&tenant, &browser), 1, false)), browser_class);
        assert_eq!(subject_of(&view.reserve(&place(&tenant, &gpu), 1, false)), gpu_class);
        assert_eq!(subject_of(&view.reserve(&place(&tenant, &browser), 1, false)), browser_class);
        // Both browser robots have an offer each: the next browser job may use the GPU robot
        // rather than wait.
        assert_eq!(subject_of(&view.reserve(&place(&tenant, &browser), 1, false)), gpu_class);
    }

    #[test]
    fn room_is_there_until_every_class_is_at_its_limit() {
        let view = FleetView::new(1);
        assert!(!view.has_room(), "no robot, no room");
        add(&view, "r1", &["shell"], 1);
        let (tenant, any) = (t(), Class::default());
        assert!(view.has_room());
        // One slot plus a prefetch of one: two offers fill the class.
        for _ in 0..2 {
            assert!(view.has_room());
            subject_of(&view.reserve(&place(&tenant, &any), 1, false));
        }
        // The robot's slot is still free: a job targeted at it could go.
        assert!(view.has_room());
        let r1 = RobotId::new("r1").unwrap();
        // One offer claimed: the robot is busy, and the other offer is the class's prefetch.
        view.unoffered(&tenant, "fleet.jobs.acme.shell");
        view.started(&tenant, &r1, JobId::new());
        assert!(!view.has_room(), "the class is at its limit and the robot is busy");
        view.unoffered(&tenant, "fleet.jobs.acme.shell");
        assert!(view.has_room(), "an offer given back makes room");
        // A robot that is offline takes nothing.
        view.offline(&tenant, &r1);
        assert!(!view.has_room());
    }

    #[test]
    fn capacity_and_prefetch_bound_the_offers() {
        let view = FleetView::new(1);
        add(&view, "r1", &["shell"], 2);
        let (tenant, any) = (t(), Class::default());
        let subject = "fleet.jobs.acme.shell";
        for _ in 0..3 {
            assert_eq!(subject_of(&view.reserve(&place(&tenant, &any), 1, false)), subject);
        }
        assert_eq!(
            view.reserve(&place(&tenant, &any), 4, false),
            Decision::Wait { reason: "all 1 eligible robot busy (position 4 in queue)".into() }
        );
        // A claim turns an offer into a running job: no room yet (2 slots, 1 running, 2 offered).
        let r1 = RobotId::new("r1").unwrap();
        let job = JobId::new();
        view.unoffered(&tenant, subject);
        view.started(&tenant, &r1, job);
        assert!(matches!(view.reserve(&place(&tenant, &any), 1, false), Decision::Wait { .. }));
        view.ended(&tenant, &r1, job);
        assert_eq!(subject_of(&view.reserve(&place(&tenant, &any), 1, false)), subject);
    }

    #[test]
    fn new_submissions_queue_behind_waiting_jobs() {
        let view = FleetView::new(0);
        add(&view, "r1", &["shell"], 1);
        let (tenant, any) = (t(), Class::default());
        view.begin_pass();
        assert!(matches!(view.reserve(&place(&tenant, &any), 1, true), Decision::Offer { .. }));
        // Full: this one waits, and blocks the class for later submissions…
        assert!(matches!(view.reserve(&place(&tenant, &any), 1, true), Decision::Wait { .. }));
        view.unoffered(&tenant, "fleet.jobs.acme.shell");
        assert!(matches!(view.reserve(&place(&tenant, &any), 2, true), Decision::Wait { .. }));
        // …but not for the admission pass, which walks the waiting jobs in order.
        view.begin_pass();
        assert!(matches!(view.reserve(&place(&tenant, &any), 1, false), Decision::Offer { .. }));
    }

    #[test]
    fn waiting_reasons() {
        let view = FleetView::new(0);
        let tenant = t();
        let d = view.reserve(&place(&tenant, &Class::parse(["gpu", "secure"]).unwrap()), 1, false);
        assert_eq!(
            d,
            Decision::Wait { reason: "no online robot of tenant acme has capabilities gpu+secure".into() }
        );
        let r7 = RobotId::new("r7").unwrap();
        let any = Class::default();
        let targeted = Placing { tenant: &tenant, requires: &any, target: Some(&r7), rejected: &[] };
        assert_eq!(
            view.reserve(&targeted, 1, false),
            Decision::Wait { reason: "target robot r7 is offline".into() }
        );
        add(&view, "r7", &["shell"], 1);
        assert_eq!(subject_of(&view.reserve(&targeted, 1, false)), "fleet.jobs.acme.robot.r7");
        assert_eq!(
            view.reserve(&targeted, 1, false),
            Decision::Wait { reason: "target robot r7 is busy".into() }
        );
        let gpu = Class::parse(["gpu"]).unwrap();
        let lacking = Placing { tenant: &tenant, requires: &gpu, target: Some(&r7), rejected: &[] };
        assert_eq!(
            view.reserve(&lacking, 1, false),
            Decision::Wait { reason: "target robot r7 lacks capabilities gpu".into() }
        );
        assert!(view.offline(&tenant, &r7));
        assert!(!view.offline(&tenant, &r7));
        assert_eq!(
            view.reserve(&place(&tenant, &any), 1, false),
            Decision::Wait { reason: "no online robot of tenant acme".into() }
        );
    }

    #[test]
    fn rejected_jobs_avoid_the_robots_that_rejected_them() {
        let view = FleetView::new(0);
        add(&view, "r1", &["shell"], 1);
        add(&view, "r2", &["shell"], 1);
        let (tenant, any) = (t(), Class::default());
        let rejected = vec![("r1".to_owned(), "draining".to_owned())];
        let job = Placing { tenant: &tenant, requires: &any, target: None, rejected: &rejected };
        assert_eq!(subject_of(&view.reserve(&job, 1, false)), "fleet.jobs.acme.robot.r2");
        let both = vec![("r1".to_owned(), "draining".to_owned()), ("r2".to_owned(), "no runner".to_owned())];
        let job = Placing { tenant: &tenant, requires: &any, target: None, rejected: &both };
        assert_eq!(
            view.reserve(&job, 1, false),
            Decision::Fail {
                reason: "rejected by every eligible robot: r1 (draining), r2 (no runner)".into()
            }
        );
    }

    #[test]
    fn outranked_names_the_classes_holding_lower_offers() {
        let view = FleetView::new(2);
        add(&view, "r1", &["shell"], 1);
        let (tenant, any) = (t(), Class::default());
        let subject = "fleet.jobs.acme.shell";
        assert!(view.outranked(&tenant, &any, 20).is_empty(), "no offers");
        // Two offers: priority 5, then 2.
        for priority in [5, 2] {
            assert_eq!(subject_of(&view.reserve(&place(&tenant, &any), 1, false)), subject);
            view.offered_priority(&tenant, subject, priority);
        }
        assert_eq!(view.outranked(&tenant, &any, 3), vec![subject.to_owned()]);
        assert!(view.outranked(&tenant, &any, 2).is_empty(), "a tie does not outrank");
        assert!(view.outranked(&tenant, &Class::parse(["gpu"]).unwrap(), 20).is_empty(), "cannot run there");
        // The database said only the priority-5 offer is left.
        view.unoffered(&tenant, subject);
        view.set_lowest(&tenant, subject, Some(5));
        assert!(view.outranked(&tenant, &any, 3).is_empty());
        assert_eq!(view.outranked(&tenant, &any, 6), vec![subject.to_owned()]);
        // The last offer claimed: nothing left to outrank.
        view.unoffered(&tenant, subject);
        assert!(view.outranked(&tenant, &any, 20).is_empty());
    }

    #[test]
    fn a_job_two_classes_could_run_gets_no_prefetch() {
        let view = FleetView::new(2);
        add(&view, "b1", &["browser", "shell"], 1);
        add(&view, "g1", &["browser", "gpu", "shell"], 1);
        let (tenant, browser, gpu) =
            (t(), Class::parse(["browser"]).unwrap(), Class::parse(["gpu"]).unwrap());
        // One free slot per class, no more.
        for _ in 0..2 {
            subject_of(&view.reserve(&place(&tenant, &browser), 1, false));
        }
        assert!(matches!(view.reserve(&place(&tenant, &browser), 1, false), Decision::Wait { .. }));
        // A job only one class can run still has its prefetch.
        for _ in 0..2 {
            subject_of(&view.reserve(&place(&tenant, &gpu), 1, false));
        }
        assert!(matches!(view.reserve(&place(&tenant, &gpu), 1, false), Decision::Wait { .. }));
    }

    #[test]
    fn tenants_are_separate() {
        let view = FleetView::new(0);
        add(&view, "r1", &["shell"], 1);
        let other = TenantId::new("other").unwrap();
        let any = Class::default();
        assert!(matches!(view.reserve(&place(&other, &any), 1, false), Decision::Wait { .. }));
        assert!(!view.is_online(&other, &RobotId::new("r1").unwrap()));
    }
}
