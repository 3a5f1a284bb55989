//! The leader's in-memory view of the fleet, fed by registrations and the heartbeat bucket, and
//! the admission decision made from it.
//!
//! Admission reads only memory, so a submit costs no extra database round trip to find a class.
//! The view is rebuilt from the bucket whenever an instance becomes leader.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Instant;

use fleet_schemas::robot::{Heartbeat, RobotRunState};
use fleet_schemas::{Class, RobotId, SessionId, TenantId, subjects};

/// What the leader knows of one robot.
#[derive(Debug, Clone)]
pub struct RobotEntry {
    pub class: Class,
    pub max_jobs: u32,
    pub running: u32,
    pub state: RobotRunState,
    pub session: SessionId,
    pub online: bool,
    pub last_seen: Instant,
}

impl RobotEntry {
    fn takes_work(&self) -> bool {
        self.online && self.state == RobotRunState::Online
    }

    fn free_slots(&self) -> u32 {
        self.max_jobs.saturating_sub(self.running)
    }
}

/// Where admission sends a job, or why it waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Publish the offer on `subject`; `target` names the class or robot for events.
    Offer {
        subject: String,
        target: String,
        class: Option<Class>,
    },
    Wait {
        reason: String,
    },
}

#[derive(Default)]
pub struct FleetView {
    tenants: RwLock<HashMap<TenantId, HashMap<RobotId, RobotEntry>>>,
}

impl FleetView {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn clear(&self) {
        self.tenants.write().expect("not poisoned").clear();
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
        let entry =
            tenants.entry(tenant.clone()).or_default().entry(robot.clone()).or_insert_with(|| RobotEntry {
                class: class.clone(),
                max_jobs,
                running: 0,
                state: RobotRunState::Online,
                session,
                online: true,
                last_seen: Instant::now(),
            });
        entry.class = class;
        entry.max_jobs = max_jobs;
        entry.session = session;
        entry.online = true;
        entry.state = RobotRunState::Online;
        entry.last_seen = Instant::now();
    }

    /// A heartbeat arrived. Returns true when the robot was not known online before (it came
    /// back, or the leader just started): admission should run.
    pub fn heartbeat(&self, hb: &Heartbeat) -> bool {
        let class = match Class::parse(&hb.capabilities) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(robot = %hb.robot_id, error = %e, "heartbeat with invalid capabilities ignored");
                return false;
            }
        };
        let mut tenants = self.tenants.write().expect("not poisoned");
        let robots = tenants.entry(hb.tenant.clone()).or_default();
        let entry = robots.entry(hb.robot_id.clone()).or_insert_with(|| RobotEntry {
            class: class.clone(),
            max_jobs: hb.max_jobs,
            running: 0,
            state: hb.state,
            session: hb.session_id,
            online: false,
            last_seen: Instant::now(),
        });
        let came_online =
            !entry.online || entry.state != hb.state || entry.running as usize != hb.running.len();
        entry.class = class;
        entry.max_jobs = hb.max_jobs;
        entry.running = hb.running.len() as u32;
        entry.state = hb.state;
        entry.session = hb.session_id;
        entry.online = true;
        entry.last_seen = Instant::now();
        came_online
    }

    /// The robot's heartbeat expired. Returns true when it was online.
    pub fn offline(&self, tenant: &TenantId, robot: &RobotId) -> bool {
        let mut tenants = self.tenants.write().expect("not poisoned");
        match tenants.get_mut(tenant).and_then(|r| r.get_mut(robot)) {
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
            .flat_map(|(t, robots)| {
                robots
                    .iter()
                    .filter(|(_, e)| e.online && e.last_seen.elapsed() > timeout)
                    .map(move |(r, _)| (t.clone(), r.clone()))
            })
            .collect()
    }

    pub fn is_online(&self, tenant: &TenantId, robot: &RobotId) -> bool {
        self.tenants
            .read()
            .expect("not poisoned")
            .get(tenant)
            .and_then(|r| r.get(robot))
            .is_some_and(|e| e.online)
    }

    pub fn session(&self, tenant: &TenantId, robot: &RobotId) -> Option<SessionId> {
        self.tenants.read().expect("not poisoned").get(tenant).and_then(|r| r.get(robot)).map(|e| e.session)
    }

    /// Note locally that an offer went to a class robot or a claim took a slot, so the next
    /// decision sees it before the next heartbeat.
    pub fn note_claim(&self, tenant: &TenantId, robot: &RobotId) {
        let mut tenants = self.tenants.write().expect("not poisoned");
        if let Some(e) = tenants.get_mut(tenant).and_then(|r| r.get_mut(robot)) {
            e.running = (e.running + 1).min(e.max_jobs);
        }
    }

    /// Decide where a job goes. Best fit first (fewest capabilities beyond what the job needs),
    /// then the class with the most free slots. Classes whose robots are all busy still take
    /// the offer (it waits in the class's queue, served in order); the routing issue adds
    /// capacity-bounded admission on top of this.
    pub fn decide(&self, tenant: &TenantId, requires: &Class, target: Option<&RobotId>) -> Decision {
        let tenants = self.tenants.read().expect("not poisoned");
        let robots = tenants.get(tenant);
        if let Some(target) = target {
            return match robots.and_then(|r| r.get(target)) {
                Some(e) if e.takes_work() && e.class.is_superset(requires) => Decision::Offer {
                    subject: subjects::robot_offers(tenant, target),
                    target: format!("robot {target}"),
                    class: None,
                },
                Some(e) if e.online && !e.class.is_superset(requires) => Decision::Wait {
                    reason: format!(
                        "target robot {target} lacks capabilities {}",
                        missing(requires, &e.class).join("+")
                    ),
                },
                Some(e) if e.online => {
                    Decision::Wait { reason: format!("target robot {target} is not taking work") }
                }
                _ => Decision::Wait { reason: format!("target robot {target} is offline") },
            };
        }
        // class -> (online robots, free slots)
        let mut classes: HashMap<&Class, (u32, u32)> = HashMap::new();
        for e in robots.into_iter().flat_map(|r| r.values()) {
            if e.takes_work() && e.class.is_superset(requires) {
                let c = classes.entry(&e.class).or_default();
                c.0 += 1;
                c.1 += e.free_slots();
            }
        }
        let best = classes.iter().min_by(|a, b| {
            let extra_a = a.0.len() - requires.len();
            let extra_b = b.0.len() - requires.len();
            extra_a.cmp(&extra_b).then(b.1.1.cmp(&a.1.1)).then(a.0.name().cmp(&b.0.name()))
        });
        match best {
            Some((class, _)) => Decision::Offer {
                subject: subjects::class_offers(tenant, class),
                target: format!("class {}", class.name()),
                class: Some((*class).clone()),
            },
            None => Decision::Wait {
                reason: if requires.is_empty() {
                    format!("no online robot of tenant {tenant}")
                } else {
                    format!("no online robot of tenant {tenant} has capabilities {}", requires.name())
                },
            },
        }
    }
}

fn missing(requires: &Class, has: &Class) -> Vec<String> {
    requires.iter().filter(|c| !has.contains(c.as_str())).map(|c| c.to_string()).collect()
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

    #[test]
    fn best_fit_then_most_free() {
        let view = FleetView::new();
        add(&view, "gpu", &["browser", "gpu", "shell"], 4);
        add(&view, "b1", &["browser", "shell"], 1);
        add(&view, "b2", &["browser", "shell"], 1);
        let d = view.decide(&t(), &Class::parse(["browser"]).unwrap(), None);
        assert_eq!(
            d,
            Decision::Offer {
                subject: "fleet.jobs.acme.browser+shell".into(),
                target: "class browser+shell".into(),
                class: Some(Class::parse(["browser", "shell"]).unwrap())
            }
        );
        let d = view.decide(&t(), &Class::parse(["gpu"]).unwrap(), None);
        assert!(
            matches!(d, Decision::Offer { subject, .. } if subject == "fleet.jobs.acme.browser+gpu+shell")
        );
    }

    #[test]
    fn waiting_reasons() {
        let view = FleetView::new();
        let d = view.decide(&t(), &Class::parse(["gpu", "secure"]).unwrap(), None);
        assert_eq!(
            d,
            Decision::Wait { reason: "no online robot of tenant acme has capabilities gpu+secure".into() }
        );
        let r7 = RobotId::new("r7").unwrap();
        let d = view.decide(&t(), &Class::default(), Some(&r7));
        assert_eq!(d, Decision::Wait { reason: "target robot r7 is offline".into() });
        add(&view, "r7", &["shell"], 1);
        let d = view.decide(&t(), &Class::default(), Some(&r7));
        assert!(matches!(d, Decision::Offer { subject, .. } if subject == "fleet.jobs.acme.robot.r7"));
        assert!(view.offline(&t(), &r7));
        assert!(!view.offline(&t(), &r7));
        let d = view.decide(&t(), &Class::default(), None);
        assert_eq!(d, Decision::Wait { reason: "no online robot of tenant acme".into() });
    }

    #[test]
    fn tenants_are_separate() {
        let view = FleetView::new();
        add(&view, "r1", &["shell"], 1);
        let other = TenantId::new("other").unwrap();
        assert!(matches!(view.decide(&other, &Class::default(), None), Decision::Wait { .. }));
        assert!(!view.is_online(&other, &RobotId::new("r1").unwrap()));
    }
}
