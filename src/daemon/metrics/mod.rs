//! `--metrics-listen ADDR:PORT`: Prometheus metrics at `/metrics`.
//!
//! A scrape costs one engine round trip ([`EngineMsg::Metrics`], answered
//! with the data of `ls` and `status`); the kernel counters and the
//! connection table are read and everything is encoded here, off the engine
//! thread.
//!
//! - `http`: the tiny HTTP/1.1 responder (GET /metrics only);
//! - `encode`: the metrics and their labels;
//! - `conntrack`: current connections per rule.

mod conntrack;
mod encode;
mod http;

use std::net::SocketAddr;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};

use super::engine::{CounterReader, MetricsSnapshot};
use super::EngineMsg;
use http::{HeadError, Reply, Route};

/// Scrapes served at once; more connections are closed unanswered.
const MAX_CONNECTIONS: usize = 8;
/// Time a client has to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the engine has to answer (a change being applied goes first).
/// Below Prometheus's default scrape timeout of 10 s.
const ENGINE_TIMEOUT: Duration = Duration::from_secs(8);

/// Upper bounds (seconds) of the request latency buckets: a `ping` takes
/// well under a millisecond, a large `apply` a second or more.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// How long control-socket requests take, by command. Cheap to clone
/// (shared); recorded whether or not metrics are served.
#[derive(Debug, Clone)]
pub struct Latency(Family<CommandLabels, Histogram, fn() -> Histogram>);

impl Latency {
    /// An empty histogram family.
    pub fn new() -> Latency {
        Latency(Family::new_with_constructor(latency_histogram))
    }

    /// Records one request of `command` that took `took`.
    pub fn observe(&self, command: &str, took: Duration) {
        self.0
            .get_or_create(&CommandLabels {
                command: command.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "request_duration_seconds",
            "Time from a control-socket request to its answer, by command",
            self.0.clone(),
        );
    }
}

impl Default for Latency {
    fn default() -> Latency {
        Latency::new()
    }
}

/// Binds the metrics listener; `source` names where the address came from
/// (`--metrics-listen` or the config key) for the error. Warns when the
/// address is not loopback: the metrics show every rule's addresses.
pub async fn bind(addr: SocketAddr, source: &str) -> Result<TcpListener, String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("{source} {addr}: cannot listen there: {e}"))?;
    if !addr.ip().is_loopback() {
        tracing::warn!(
            "metrics are served on {addr}, which is not a loopback address: anyone who \
             can reach it reads every rule's addresses and counters; firewall it, or use \
             127.0.0.1 with a local Prometheus or an SSH tunnel"
        );
    }
    tracing::info!("Prometheus metrics at http://{addr}/metrics");
    Ok(listener)
}

/// Serves scrapes until the task is aborted.
pub(crate) async fn serve(
    listener: TcpListener,
    engine: mpsc::Sender<EngineMsg>,
    latency: Latency,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: wait instead of spinning.
                tracing::debug!("metrics accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::debug!("metrics: {MAX_CONNECTIONS} scrapes running, connection closed");
            continue;
        };
        let (engine, latency) = (engine.clone(), latency.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = connection(stream, &engine, &latency).await {
                tracing::debug!("metrics connection ended: {e}");
            }
        });
    }
}

/// One request, one answer, then close.
async fn connection(
    mut stream: TcpStream,
    engine: &mpsc::Sender<EngineMsg>,
    latency: &Latency,
) -> std::io::Result<()> {
    let reply = match tokio::time::timeout(READ_TIMEOUT, http::read_head(&mut stream)).await {
        Err(_) => Reply::plain("408 Request Timeout", "request head not received in time"),
        Ok(Err(HeadError::TooLarge)) => Reply::plain(
            "431 Request Header Fields Too Large",
            format!("request head over {} bytes", http::MAX_HEAD_BYTES),
        ),
        Ok(Err(HeadError::Closed)) => return Ok(()),
        Ok(Err(HeadError::Io(e))) => return Err(e),
        Ok(Ok(head)) => match http::route(&head) {
            Route::Metrics => match scrape(engine, latency).await {
                Ok(body) => Reply {
                    status: "200 OK",
                    content_type: prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                    body,
                },
                Err(e) => Reply::plain("503 Service Unavailable", e),
            },
            Route::NotFound => Reply::plain("404 Not Found", "natmap serves GET /metrics only"),
            Route::MethodNotAllowed => {
                Reply::plain("405 Method Not Allowed", "/metrics answers GET only")
            }
            Route::BadRequest => Reply::plain("400 Bad Request", "not an HTTP/1.x request"),
        },
    };
    tokio::time::timeout(WRITE_TIMEOUT, http::write(&mut stream, &reply))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// One engine round trip, the kernel counters, the connection table, the
/// text. Logs (at debug) where the time went.
async fn scrape(engine: &mpsc::Sender<EngineMsg>, latency: &Latency) -> Result<String, String> {
    let started = std::time::Instant::now();
    let (snapshot, counters) = ask_engine(engine).await?;
    let engine_took = started.elapsed();
    let snapshot = tokio::task::spawn_blocking(move || {
        let mut snapshot = snapshot;
        counters.fill(&mut snapshot.rules);
        snapshot
    })
    .await
    .map_err(|e| format!("reading the counters failed: {e}"))?;
    let counters_took = started.elapsed() - engine_took;
    let connections = conntrack::count(&snapshot.rules).await;
    let text = encode::encode(&snapshot, connections.as_ref(), latency);
    tracing::debug!(
        rules = snapshot.rules.len(),
        engine_us = engine_took.as_micros(),
        counters_us = counters_took.as_micros(),
        total_us = started.elapsed().as_micros(),
        "metrics scrape"
    );
    Ok(text)
}

/// The engine's part of a scrape, bounded by [`ENGINE_TIMEOUT`].
async fn ask_engine(
    engine: &mpsc::Sender<EngineMsg>,
) -> Result<(MetricsSnapshot, CounterReader), String> {
    let (reply, answer) = oneshot::channel();
    engine
        .send(EngineMsg::Metrics { reply })
        .map_err(|_| "the daemon is shutting down".to_owned())?;
    match tokio::time::timeout(ENGINE_TIMEOUT, answer).await {
        Ok(Ok(answer)) => Ok(*answer),
        Ok(Err(_)) => Err("the daemon is shutting down".into()),
        Err(_) => Err(format!(
            "the engine did not answer within {ENGINE_TIMEOUT:?} (busy applying a change?)"
        )),
    }
}
