//! The transport of internal unary calls: one HTTP/2 connection to each
//! upstream, driven with [`h2`] from the caller's own task.
//!
//! tonic's `Channel` hands a call to a tower `Buffer` worker task, which
//! hands it to hyper's client task, which spawns one more task per call to
//! await its answer: five task hand-offs per call, each a wake-up of a
//! thread that may be asleep. Here the caller's task writes its request
//! into the connection's shared state and the connection's task wakes the
//! caller with the answer: two. Measured (docs/benchmarks.md, twelfth
//! session): a bare forwarding hop on `h2` alone cost 62 µs at p50 where
//! the same hop on tonic's `Channel` (or on hyper-util's client, which
//! drops only the `Buffer`) cost 105 µs; the suite benchmark prints the
//! hop on this channel (its retries and trace propagation on top) beside
//! the one on tonic's.
//!
//! What tonic's `Channel` did for these calls, this does too:
//! - connects on first use, within the connect timeout, with
//!   `TCP_NODELAY`: one attempt at a time, in a task of its own, whose
//!   outcome every call waiting for it gets (a caller that gives up stops
//!   only its own wait);
//! - a call that finds its connection closed (the peer went away or sent
//!   GOAWAY) or its stream refused before the peer processed it takes a
//!   new connection at once;
//! - every call's deadline is the shorter of the caller's `grpc-timeout`
//!   and the channel's own, sent on as `grpc-timeout`; a call past it
//!   ends with DEADLINE_EXCEEDED, its answer's body included;
//! - a call abandoned before its answer came (past its deadline, or its
//!   caller gone) makes the channel PING its connection: a peer that does
//!   not answer within the connect timeout (a host gone without closing
//!   its connections) has its connection dropped, so later calls connect
//!   anew instead of each waiting out its deadline on a dead one;
//! - flow-control windows as hyper's client sets them (2 MiB a stream,
//!   5 MiB the connection), so a large answer does not wait on window
//!   updates.
//!
//! Long-lived server streams keep tonic's `Channel` (with its HTTP/2
//! keep-alive): [`super::streaming_channel`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use http::uri::{Authority, Scheme};
use http_body::Frame;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Status;

use super::BoxError;

/// The stream window hyper's client advertises.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// The connection window hyper's client advertises.
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// The largest header block (trailers with error details included) taken.
const MAX_HEADER_LIST: u32 = 64 * 1024;

static USER_AGENT: HeaderValue =
    HeaderValue::from_static(concat!("o2c-kit/", env!("CARGO_PKG_VERSION")));

/// A lazily connected HTTP/2 connection to one service, for unary calls.
/// Clones share the connection.
#[derive(Clone)]
pub struct H2Channel {
    shared: Arc<Shared>,
}

struct Shared {
    authority: Authority,
    host: String,
    port: u16,
    connect_timeout: Duration,
    call_timeout: Duration,
    slot: Mutex<Slot>,
    /// Connections made so far: the next one's id.
    made: AtomicU64,
}

/// The channel's connection, or the attempt to make one.
enum Slot {
    Idle,
    /// An attempt under way; its outcome (the error's message when it
    /// failed) once it ends.
    Connecting(watch::Receiver<Option<Result<Live, String>>>),
    Live(Live),
}

#[derive(Clone)]
struct Live {
    id: u64,
    send: h2::client::SendRequest<Bytes>,
    /// PINGs the peer after a call was abandoned; one at a time.
    ping: Option<Arc<tokio::sync::Mutex<h2::PingPong>>>,
}

/// Why a call got no answer.
enum Failure {
    /// The peer did not process the request (the connection closed or
    /// went away before it left, or the peer refused its stream): another
    /// connection may take it.
    NotSent(h2::Error),
    /// The request could not be written as it is: no connection would
    /// take it.
    Refused(h2::Error),
    /// The request left; the answer did not come.
    Sent(h2::Error),
}

impl H2Channel {
    /// A channel to `url` (`http://host:port`); it connects on first use.
    pub fn lazy(
        url: &str,
        connect_timeout: Duration,
        call_timeout: Duration,
    ) -> Result<Self, BoxError> {
        let uri: http::Uri = url.parse()?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err("the scheme must be http (internal calls are plaintext HTTP/2)".into());
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or("a host and port are required")?;
        let port = authority.port_u16().unwrap_or(80);
        // `[::1]` names the address `::1`.
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(Self {
            shared: Arc::new(Shared {
                authority,
                host,
                port,
                connect_timeout,
                call_timeout,
                slot: Mutex::new(Slot::Idle),
                made: AtomicU64::new(0),
            }),
        })
    }

    /// The deadline of a call with `headers` made now: the shorter of its
    /// `grpc-timeout` and the channel's own.
    pub(crate) fn deadline(&self, headers: &http::HeaderMap) -> Instant {
        let asked = headers
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::auth::parse_grpc_timeout);
        Instant::now()
            + asked.map_or(self.shared.call_timeout, |asked| {
                asked.min(self.shared.call_timeout)
            })
    }

    /// DEADLINE_EXCEEDED for a call to this channel's service.
    fn late(&self) -> BoxError {
        Box::new(Status::deadline_exceeded(format!(
            "{} did not answer before the call's deadline",
            self.shared.authority
        )))
    }

    /// Sends one request (`parts` and its whole `body`) and returns the
    /// answer's head, its body streaming in behind it; DEADLINE_EXCEEDED
    /// when the head has not come by `deadline`.
    pub(crate) async fn send(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
        deadline: Instant,
    ) -> Result<http::Response<tonic::body::Body>, BoxError> {
        if Instant::now() >= deadline {
            return Err(self.late());
        }
        let mut uri = http::uri::Parts::from(parts.uri.clone());
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(self.shared.authority.clone());
        let uri = http::Uri::from_parts(uri)?;
        // A request the peer did not process costs one more try, on a new
        // connection.
        let mut tries = 2;
        loop {
            tries -= 1;
            let live = tokio::time::timeout_at(deadline, self.connection())
                .await
                .map_err(|_| self.late())??;
            let mut request = http::Request::new(());
            *request.method_mut() = parts.method.clone();
            *request.uri_mut() = uri.clone();
            *request.headers_mut() = parts.headers.clone();
            let headers = request.headers_mut();
            headers.insert(
                "grpc-timeout",
                grpc_timeout(deadline.saturating_duration_since(Instant::now())),
            );
            headers.insert(http::header::USER_AGENT, USER_AGENT.clone());
            // Armed until the answer's head (or a sure failure) comes: a
            // call abandoned meanwhile, past its deadline or by its caller,
            // has the connection checked.
            let mut abandoned = Probe::of(&self.shared, &live);
            let exchanged =
                tokio::time::timeout_at(deadline, exchange(&live, request, body.clone())).await;
            let Ok(exchanged) = exchanged else {
                return Err(self.late());
            };
            let failure = match exchanged {
                Ok(response) => {
                    let probe = abandoned.take();
                    return Ok(response.map(|recv| {
                        tonic::body::Body::new(Answer {
                            recv,
                            data_done: false,
                            deadline: Box::pin(tokio::time::sleep_until(deadline)),
                            probe,
                        })
                    }));
                }
                Err(failure) => failure,
            };
            abandoned.disarm();
            match failure {
                Failure::NotSent(error) => {
                    self.shared.forget(live.id);
                    if tries == 0 {
                        return Err(Box::new(Status::unavailable(format!(
                            "{} did not take the call: {error}",
                            self.shared.authority
                        ))));
                    }
                }
                Failure::Refused(error) => {
                    return Err(Box::new(Status::internal(format!(
                        "the call to {} could not be sent: {error}",
                        self.shared.authority
                    ))));
                }
                // Mapped by tonic as for its own channel (the stream's
                // reset reason, or UNKNOWN for a broken connection).
                Failure::Sent(error) => return Err(Box::new(error)),
            }
        }
    }

    /// The live connection, or the outcome of the attempt to make one
    /// (started here when none is under way).
    async fn connection(&self) -> Result<Live, BoxError> {
        let mut attempt = {
            let mut slot = self.shared.lock();
            match &*slot {
                Slot::Live(live) => return Ok(live.clone()),
                Slot::Connecting(attempt) => attempt.clone(),
                Slot::Idle => {
                    let (outcome, attempt) = watch::channel(None);
                    *slot = Slot::Connecting(attempt.clone());
                    tokio::spawn(self.clone().connect(outcome));
                    attempt
                }
            }
        };
        let waited = attempt
            .wait_for(Option::is_some)
            .await
            .map(|outcome| outcome.clone());
        let outcome = match waited {
            Ok(outcome) => outcome,
            Err(_) => {
                // The attempt's task ended without an outcome (its runtime
                // is stopping): the next call tries afresh.
                let mut slot = self.shared.lock();
                if matches!(&*slot, Slot::Connecting(a) if a.same_channel(&attempt)) {
                    *slot = Slot::Idle;
                }
                None
            }
        };
        match outcome {
            Some(Ok(live)) => Ok(live),
            Some(Err(message)) => Err(Box::new(Status::unavailable(message))),
            None => Err(Box::new(Status::unavailable("no connection"))),
        }
    }

    /// One attempt to connect, within the connect timeout; its outcome
    /// goes in the slot and to every call waiting for it.
    async fn connect(self, outcome: watch::Sender<Option<Result<Live, String>>>) {
        let shared = &self.shared;
        let made = tokio::time::timeout(shared.connect_timeout, self.handshake())
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "connecting to {} took longer than {} ms",
                    shared.authority,
                    shared.connect_timeout.as_millis()
                ))
            });
        let made = match made {
            Ok((live, connection)) => {
                *shared.lock() = Slot::Live(live.clone());
                // Driven from here on; when it ends (the peer closed it,
                // or every handle is gone), the slot lets it go.
                let owner = Arc::downgrade(shared);
                let (id, authority) = (live.id, shared.authority.clone());
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%authority, %error, "internal connection ended");
                    }
                    if let Some(shared) = owner.upgrade() {
                        shared.forget(id);
                    }
                });
                Ok(live)
            }
            Err(message) => {
                *shared.lock() = Slot::Idle;
                Err(message)
            }
        };
        outcome.send_replace(Some(made));
    }

    async fn handshake(
        &self,
    ) -> Result<(Live, h2::client::Connection<tokio::net::TcpStream, Bytes>), String> {
        let shared = &self.shared;
        let refused =
            |error: &dyn std::fmt::Display| format!("connecting to {}: {error}", shared.authority);
        let tcp = tokio::net::TcpStream::connect((shared.host.as_str(), shared.port))
            .await
            .map_err(|e| refused(&e))?;
        tcp.set_nodelay(true).map_err(|e| refused(&e))?;
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            .enable_push(false)
            .handshake::<_, Bytes>(tcp)
            .await
            .map_err(|e| refused(&e))?;
        let ping = connection
            .ping_pong()
            .map(|ping| Arc::new(tokio::sync::Mutex::new(ping)));
        let id = shared.made.fetch_add(1, Ordering::Relaxed) + 1;
        Ok((Live { id, send, ping }, connection))
    }
}

/// The channel on its own, without the retries and trace propagation of
/// [`super::channel`] (for measuring the transport alone).
impl tower::Service<http::Request<tonic::body::Body>> for H2Channel {
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        use http_body_util::BodyExt;
        let channel = self.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = body.collect().await?.to_bytes();
            let deadline = channel.deadline(&parts.headers);
            channel.send(&parts, body, deadline).await
        })
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lets connection `id` go, unless another already replaced it;
    /// whether it did.
    fn forget(&self, id: u64) -> bool {
        let mut slot = self.lock();
        let current = matches!(&*slot, Slot::Live(live) if live.id == id);
        if current {
            *slot = Slot::Idle;
        }
        current
    }
}

impl std::fmt::Debug for H2Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Channel")
            .field("authority", &self.shared.authority)
            .field("call_timeout", &self.shared.call_timeout)
            .finish_non_exhaustive()
    }
}

/// Checks a connection with a PING when dropped armed: the call on it was
/// abandoned before its answer came. A slow service answers PINGs from its
/// connection's task while its handler still works; a peer that does not
/// answer within the connect timeout has its connection let go.
struct Probe {
    armed: Option<(Weak<Shared>, u64, Arc<tokio::sync::Mutex<h2::PingPong>>)>,
}

impl Probe {
    fn of(shared: &Arc<Shared>, live: &Live) -> Self {
        Self {
            armed: live
                .ping
                .clone()
                .map(|ping| (Arc::downgrade(shared), live.id, ping)),
        }
    }

    /// Hands this one's charge on (to the answer's body).
    fn take(&mut self) -> Self {
        Self {
            armed: self.armed.take(),
        }
    }

    fn disarm(&mut self) {
        self.armed = None;
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let Some((shared, id, ping)) = self.armed.take() else {
            return;
        };
        // Outside a runtime (it is shutting down) there is nothing to keep.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            // One PING at a time: a probe under way answers for the others.
            let Ok(mut ping) = ping.try_lock() else {
                return;
            };
            let Some(patience) = shared.upgrade().map(|s| s.connect_timeout) else {
                return;
            };
            let answered = tokio::time::timeout(patience, ping.ping(h2::Ping::opaque())).await;
            if !matches!(answered, Ok(Ok(_)))
                && let Some(shared) = shared.upgrade()
                && shared.forget(id)
            {
                tracing::warn!(
                    authority = %shared.authority,
                    "an internal connection did not answer a PING; connecting anew"
                );
            }
        });
    }
}

/// Sends `request` with `body` on `live` and awaits the answer's head.
async fn exchange(
    live: &Live,
    request: http::Request<()>,
    body: Bytes,
) -> Result<http::Response<h2::RecvStream>, Failure> {
    let mut send = live.send.clone().ready().await.map_err(Failure::NotSent)?;
    let (response, mut stream) = send
        .send_request(request, body.is_empty())
        .map_err(|error| {
            if error.is_go_away() || error.is_io() {
                Failure::NotSent(error)
            } else {
                Failure::Refused(error)
            }
        })?;
    if !body.is_empty() {
        stream.send_data(body, true).map_err(Failure::Sent)?;
    }
    response.await.map_err(|error| {
        // A stream the peer refused, or one past the last it said it would
        // process when it went away, was not processed.
        let unprocessed = error.reason() == Some(h2::Reason::REFUSED_STREAM)
            || (error.is_go_away() && error.is_remote());
        if unprocessed {
            Failure::NotSent(error)
        } else {
            Failure::Sent(error)
        }
    })
}

/// `timeout` as a `grpc-timeout` value: the finest unit that fits gRPC's
/// eight digits.
fn grpc_timeout(timeout: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let value = if timeout.as_micros() <= MAX {
        format!("{}u", timeout.as_micros())
    } else if timeout.as_millis() <= MAX {
        format!("{}m", timeout.as_millis())
    } else {
        format!("{}S", u128::from(timeout.as_secs()).min(MAX))
    };
    HeaderValue::try_from(value).unwrap_or(HeaderValue::from_static("99999999S"))
}

/// An answer's body: its data, then its trailers (gRPC's status), all by
/// the call's deadline.
struct Answer {
    recv: h2::RecvStream,
    data_done: bool,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// Disarmed once the whole answer came; armed, dropped with a body
    /// that stalled.
    probe: Probe,
}

impl Answer {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Read: the peer may send as much again.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error.into()))),
                None => self.data_done = true,
            }
        }
        Poll::Ready(match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(error) => Some(Err(error.into())),
        })
    }
}

impl http_body::Body for Answer {
    type Data = Bytes;
    // An h2 error (mapped by tonic as for its own channel), or
    // DEADLINE_EXCEEDED.
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Poll::Ready(next) = self.poll_next(cx) {
            if matches!(next, None | Some(Err(_))) {
                self.probe.disarm();
            }
            return Poll::Ready(next);
        }
        ready!(self.deadline.as_mut().poll(cx));
        Poll::Ready(Some(Err(Box::new(Status::deadline_exceeded(
            "the answer did not arrive whole before the call's deadline",
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_written_in_the_finest_unit_that_fits() {
        let written = |d| grpc_timeout(d).to_str().unwrap().to_owned();
        assert_eq!(written(Duration::from_micros(300)), "300u");
        assert_eq!(written(Duration::from_secs(5)), "5000000u");
        assert_eq!(written(Duration::from_secs(1_000)), "1000000m");
        assert_eq!(written(Duration::from_secs(200_000)), "200000S");
        for d in [
            Duration::from_micros(1),
            Duration::from_secs(5),
            Duration::from_secs(1_000),
        ] {
            assert_eq!(
                crate::auth::parse_grpc_timeout(&written(d)),
                Some(d),
                "{d:?}"
            );
        }
    }

    #[test]
    fn only_plain_http_addresses_with_a_host_are_taken() {
        let second = Duration::from_secs(1);
        let v6 = H2Channel::lazy("http://[::1]:50052", second, second).unwrap();
        assert_eq!((v6.shared.host.as_str(), v6.shared.port), ("::1", 50052));
        let named = H2Channel::lazy("http://credit", second, second).unwrap();
        assert_eq!(
            (named.shared.host.as_str(), named.shared.port),
            ("credit", 80)
        );
        for bad in ["https://credit:50052", "credit:50052", "/credit", "http://"] {
            assert!(H2Channel::lazy(bad, second, second).is_err(), "{bad}");
        }
    }
}
