//! `GET /metrics`: the gateway's own figures in the Prometheus text format.
//!
//! Hand-rolled rather than a metrics crate: four metric families with fixed labels (route
//! template, method, status) are a few dozen lines, and the text format is stable and simple.
//! Routes are labelled by their template (`/api/v1/metrics/jobs/{job_id}`), never by the
//! concrete path, so the number of series stays bounded whatever clients send; requests that
//! match no route share the label `unmatched`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency histogram, in seconds.
pub const LATENCY_BUCKETS: [f64; 12] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Debug, Default)]
struct Histogram {
    /// Cumulative counts per bucket of [`LATENCY_BUCKETS`].
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// The gateway's request figures.
#[derive(Debug, Default)]
pub struct Metrics {
    in_flight: AtomicI64,
    /// (route, method, status) → count.
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    /// (route, method) → latency.
    latency: Mutex<BTreeMap<(String, String), Histogram>>,
}

/// Decrements the in-flight gauge when the request ends, however it ends.
pub struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    pub fn record(&self, route: &str, method: &str, status: u16, latency: Duration) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route.to_owned(), method.to_owned(), status)).or_default() += 1;
        }
        let secs = latency.as_secs_f64();
        if let Ok(mut m) = self.latency.lock() {
            let h = m.entry((route.to_owned(), method.to_owned())).or_default();
            for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
                if secs <= *le {
                    h.buckets[i] += 1;
                }
            }
            h.count += 1;
            h.sum += secs;
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self, nats_connected: bool) -> String {
        let mut out = String::new();
        out.push_str("# HELP fleet_gateway_requests_total HTTP requests answered, by route template, method and status.\n");
        out.push_str("# TYPE fleet_gateway_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((route, method, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "fleet_gateway_requests_total{{route=\"{}\",method=\"{}\",status=\"{status}\"}} {n}",
                    escape(route),
                    escape(method)
                );
            }
        }
        out.push_str("# HELP fleet_gateway_request_duration_seconds Time to answer (headers of streams), by route template and method.\n");
        out.push_str("# TYPE fleet_gateway_request_duration_seconds histogram\n");
        if let Ok(m) = self.latency.lock() {
            for ((route, method), h) in m.iter() {
                let labels = format!("route=\"{}\",method=\"{}\"", escape(route), escape(method));
                for (le, n) in LATENCY_BUCKETS.iter().zip(h.buckets) {
                    let _ = writeln!(
                        out,
                        "fleet_gateway_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {n}"
                    );
                }
                let _ = writeln!(
                    out,
                    "fleet_gateway_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                    h.count
                );
                let _ = writeln!(out, "fleet_gateway_request_duration_seconds_sum{{{labels}}} {}", h.sum);
                let _ = writeln!(out, "fleet_gateway_request_duration_seconds_count{{{labels}}} {}", h.count);
            }
        }
        out.push_str("# HELP fleet_gateway_requests_in_flight Requests being answered now.\n");
        out.push_str("# TYPE fleet_gateway_requests_in_flight gauge\n");
        let _ = writeln!(out, "fleet_gateway_requests_in_flight {}", self.in_flight.load(Ordering::Relaxed));
        out.push_str("# HELP fleet_gateway_nats_connected 1 when the gateway's NATS connection is up.\n");
        out.push_str("# TYPE fleet_gateway_nats_connected gauge\n");
        let _ = writeln!(out, "fleet_gateway_nats_connected {}", u8::from(nats_connected));
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format() {
        let m = Metrics::default();
        {
            let _a = m.start();
            assert!(m.render(true).contains("fleet_gateway_requests_in_flight 1\n"));
        }
        m.record("/api/v1/metrics/jobs/{job_id}", "GET", 404, Duration::from_millis(3));
        m.record("/api/v1/metrics/jobs/{job_id}", "GET", 404, Duration::from_millis(30));
        let text = m.render(false);
        assert!(text.contains(
            "fleet_gateway_requests_total{route=\"/api/v1/metrics/jobs/{job_id}\",method=\"GET\",status=\"404\"} 2\n"
        ));
        assert!(text.contains("le=\"0.005\"} 1\n"), "{text}");
        assert!(text.contains("le=\"0.05\"} 2\n"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 2\n"));
        assert!(text.contains("fleet_gateway_requests_in_flight 0\n"));
        assert!(text.contains("fleet_gateway_nats_connected 0\n"));
    }
}
