//! The yardstick for the gateway's cost: a trivial echo service and a bare
//! tonic server that forwards each call to it, decoding and re-encoding
//! as a gateway does, with nothing else (no auth, no limits, no tracing).
//! Both speak the credit check's own messages, so the bytes on the wire
//! are those of the real check. The forwarder can also stand in front of
//! the real credit service: a bare hop on the real check, with the same
//! time at the database, is the yardstick beside the echo's.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use o2c_proto::credit::v1::{CheckAndReserveRequest, CheckAndReserveResponse, CreditDecision};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

const PATH: &str = "/bench.Echo/Check";
/// Credit's own method, for a forwarder in front of the real service.
pub const CREDIT_CHECK: &str = "/o2c.credit.v1.CreditService/CheckAndReserve";

type Reply =
    Pin<Box<dyn Future<Output = Result<Response<CheckAndReserveResponse>, Status>> + Send>>;
type Handler = Arc<dyn Fn(Request<CheckAndReserveRequest>) -> Reply + Send + Sync>;

/// A one-method gRPC service, written as tonic's generated servers are.
#[derive(Clone)]
struct Unary(Handler);

impl tonic::server::NamedService for Unary {
    const NAME: &'static str = "bench.Echo";
}

struct Call(Handler);

impl tonic::server::UnaryService<CheckAndReserveRequest> for Call {
    type Response = CheckAndReserveResponse;
    type Future = Reply;

    fn call(&mut self, request: Request<CheckAndReserveRequest>) -> Self::Future {
        (self.0)(request)
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Unary {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let handler = self.0.clone();
        Box::pin(async move {
            if request.uri().path() != PATH {
                return Ok(Status::unimplemented("no such method").into_http());
            }
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(Call(handler), request).await)
        })
    }
}

/// What a client calls over: tonic's `Channel`, or the kit's channel.
pub trait Transport:
    tonic::client::GrpcService<
        tonic::body::Body,
        Error: Into<tonic::codegen::StdError>,
        ResponseBody: http_body::Body<
            Data = bytes::Bytes,
            Error: Into<tonic::codegen::StdError> + Send,
        > + Send
                          + 'static,
        Future: Send,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> Transport for T where
    T: tonic::client::GrpcService<
            tonic::body::Body,
            Error: Into<tonic::codegen::StdError>,
            ResponseBody: http_body::Body<
                Data = bytes::Bytes,
                Error: Into<tonic::codegen::StdError> + Send,
            > + Send
                              + 'static,
            Future: Send,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// A client of either server.
#[derive(Clone)]
pub struct Client<T = Channel>(tonic::client::Grpc<T>);

impl<T: Transport> Client<T> {
    pub fn new(channel: T) -> Self {
        Self(tonic::client::Grpc::new(channel))
    }

    pub async fn check(
        &mut self,
        request: CheckAndReserveRequest,
    ) -> Result<CheckAndReserveResponse, Status> {
        self.call(Request::new(request), PATH).await
    }

    /// A check with the request's metadata (to a forwarder).
    pub async fn check_with(
        &mut self,
        request: Request<CheckAndReserveRequest>,
    ) -> Result<CheckAndReserveResponse, Status> {
        self.call(request, PATH).await
    }

    /// A call of `path` with the request's metadata.
    async fn call(
        &mut self,
        request: Request<CheckAndReserveRequest>,
        path: &'static str,
    ) -> Result<CheckAndReserveResponse, Status> {
        self.0
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.into().to_string()))?;
        self.0
            .unary(
                request,
                http::uri::PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .map(Response::into_inner)
    }
}

async fn serve(handler: Handler) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Unary(handler))
            .serve_with_incoming(o2c_kit::serve::incoming(listener)),
    );
    Ok(addr)
}

/// Answers every check with an approval naming the order.
pub async fn echo() -> std::io::Result<SocketAddr> {
    serve(Arc::new(|request: Request<CheckAndReserveRequest>| {
        let request = request.into_inner();
        Box::pin(async move {
            Ok(Response::new(CheckAndReserveResponse {
                decision: Some(CreditDecision {
                    decision_id: request.idempotency_key,
                    order_id: request.order_id,
                    amount: request.amount,
                    ..Default::default()
                }),
            }))
        })
    }))
    .await
}

/// Forwards every call to `path` of `upstream`, with its metadata (the
/// caller's credentials, say): tonic drops the reserved headers.
pub async fn forwarder<T: Transport>(
    upstream: T,
    path: &'static str,
) -> std::io::Result<SocketAddr> {
    let client = Client::new(upstream);
    serve(Arc::new(move |request: Request<CheckAndReserveRequest>| {
        let mut client = client.clone();
        Box::pin(async move {
            let (metadata, _, message) = request.into_parts();
            let forwarded = Request::from_parts(metadata, Default::default(), message);
            client.call(forwarded, path).await.map(Response::new)
        })
    }))
    .await
}

/// Forwards to the echo service.
pub async fn echo_forwarder<T: Transport>(upstream: T) -> std::io::Result<SocketAddr> {
    forwarder(upstream, PATH).await
}
