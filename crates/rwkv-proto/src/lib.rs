//! Wire types of the RWKV serving cluster: the code generated from `proto/` and nothing else.
//!
//! This crate owns the protobuf messages and gRPC stubs (client and server) of every service in
//! `proto/`, the trace context that travels with calls as metadata ([`trace`]), the worker
//! token routers present to workers ([`auth`]), plus small
//! helpers for reading them. It never depends on other workspace crates, so a
//! change to the engine or the model never changes the wire. Whoever receives a message converts
//! it to its own domain types and validates it there (the worker into engine requests, the router
//! into its API types); the helpers here only make those conversions uniform.

/// `rwkv.worker.v1`: the service every worker serves and the router calls.
pub mod worker {
    pub mod v1 {
        tonic::include_proto!("rwkv.worker.v1");
    }
}

pub use worker::v1 as wv1;

/// `rwkv.api.v1`: the public API the router serves next to its HTTP API.
pub mod api {
    pub mod v1 {
        tonic::include_proto!("rwkv.api.v1");
    }
}

pub use api::v1 as av1;

pub mod auth;
pub mod trace;
pub use trace::TraceContext;

/// A message field that failed a receiver's check; becomes `INVALID_ARGUMENT` naming the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid `{field}`: {reason}")]
pub struct FieldError {
    pub field: &'static str,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

impl From<FieldError> for tonic::Status {
    fn from(e: FieldError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// A count as the `u32` the wire carries, saturating (counts beyond 4 G do not occur in practice,
/// and a saturated number is still a true lower bound).
pub fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl wv1::GenerateEvent {
    /// A token event.
    pub fn token(token: wv1::Token) -> Self {
        Self {
            event: Some(wv1::generate_event::Event::Token(token)),
            choice: 0,
        }
    }

    /// The final event of a choice (of the stream, when there is one choice).
    pub fn finished(finished: wv1::Finished) -> Self {
        Self {
            event: Some(wv1::generate_event::Event::Finished(finished)),
            choice: 0,
        }
    }

    /// The same event, for choice `choice` of a multi-choice request.
    pub fn for_choice(self, choice: u32) -> Self {
        Self { choice, ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn unset_sampling_fields_stay_distinguishable_from_zero() {
        let params = wv1::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        };
        let back = wv1::SamplingParams::decode(params.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back.temperature, Some(0.0));
        assert_eq!(back.top_p, None);
    }

    #[test]
    fn field_errors_become_invalid_argument_naming_the_field() {
        let status: tonic::Status = FieldError::new("params.top_p", "must be in [0, 1]").into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("params.top_p"));
    }
}
