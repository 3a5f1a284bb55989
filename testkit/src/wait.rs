//! Bounded polling: the one way tests wait for something to become true.
//!
//! Fleet's parts work asynchronously (a job completes some time after the submit returns), so
//! tests poll. Each wait has a timeout, each poll is itself cut off at that timeout (a hung
//! request cannot stall the test), and a timeout names the caller's file and line.

use std::fmt::Display;
use std::future::Future;
use std::panic::Location;
use std::time::Duration;

use tokio::time::Instant;

/// First pause between polls; it doubles up to [`MAX_PAUSE`]. Short at first so fast conditions
/// cost little, capped so a slow one is still noticed within a tenth of a second.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
const MAX_PAUSE: Duration = Duration::from_millis(100);

/// Polls `condition` until it returns `Some(value)` and returns that value, or fails once
/// `timeout` has passed. The error names the calling file and line.
///
/// ```no_run
/// # async fn demo(client: reqwest::Client, url: String) -> anyhow::Result<()> {
/// use std::time::Duration;
/// let body: serde_json::Value = fleet_testkit::wait_until(Duration::from_secs(10), || async {
///     let job: serde_json::Value = client.get(&url).send().await.ok()?.json().await.ok()?;
///     (job["status"] == "completed").then_some(job)
/// })
/// .await?;
/// # Ok(()) }
/// ```
#[track_caller]
pub fn wait_until<T, F, Fut>(timeout: Duration, condition: F) -> impl Future<Output = anyhow::Result<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll(None, Location::caller(), timeout, condition)
}

/// Like [`wait_until`], with a description of what is awaited for the error message
/// (`"job 0193… to complete"`).
#[track_caller]
pub fn wait_for<T, F, Fut>(
    what: impl Display,
    timeout: Duration,
    condition: F,
) -> impl Future<Output = anyhow::Result<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll(Some(what.to_string()), Location::caller(), timeout, condition)
}

async fn poll<T, F, Fut>(
    what: Option<String>,
    caller: &'static Location<'static>,
    timeout: Duration,
    mut condition: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    let mut pause = FIRST_PAUSE;
    let mut polls: u32 = 0;
    loop {
        polls += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Ok(Some(value)) = tokio::time::timeout(remaining, condition()).await {
            return Ok(value);
        }
        let now = Instant::now();
        if now >= deadline {
            let what = what.map(|w| format!(" for {w}")).unwrap_or_default();
            anyhow::bail!(
                "waited{what} at {caller}: condition not met within {timeout:?} \
                 ({polls} polls over {:?})",
                now - start
            );
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn returns_the_value_once_the_condition_holds() {
        let calls = AtomicU32::new(0);
        let value = wait_until(Duration::from_secs(5), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            (n >= 3).then_some(n * 10)
        })
        .await
        .unwrap();
        assert_eq!(value, 30);
    }

    #[tokio::test]
    async fn times_out_naming_the_caller_and_what_was_awaited() {
        let error = wait_for("the impossible", Duration::from_millis(200), || async { None::<()> })
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("for the impossible"), "{error}");
        assert!(error.contains(file!()), "error should name the calling file: {error}");
        assert!(error.contains("200ms"), "{error}");
    }

    #[tokio::test]
    async fn a_hanging_condition_is_cut_off_at_the_timeout() {
        let started = Instant::now();
        let result =
            wait_until(Duration::from_millis(200), || async { std::future::pending::<Option<()>>().await })
                .await;
        assert!(result.is_err());
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    }
}
