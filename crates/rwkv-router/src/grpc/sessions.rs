//! The `Sessions` service of the public gRPC API: every operation goes through
//! [`crate::sessions::ops`], like its HTTP twin under `/v1/sessions`.

use rwkv_proto::av1;
use rwkv_proto::av1::sessions_server::Sessions;
use tonic::{Request, Response, Status};

use super::{sampling_of, session_of, status_of, EventStream, PublicApi};
use crate::api::{self, Content};
use crate::http::{self, Dialect};
use crate::sessions::ops;

#[tonic::async_trait]
impl Sessions for PublicApi {
    type SendStream = EventStream;

    async fn create(
        &self,
        request: Request<av1::CreateSessionRequest>,
    ) -> Result<Response<av1::Session>, Status> {
        let tenant = self.tenant(&request)?;
        let req = request.into_inner();
        let model = Some(req.model).filter(|m| !m.is_empty());
        let view = ops::create(&self.state, &tenant, model, req.system.as_deref())
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(session_of(&view)))
    }

    async fn get(
        &self,
        request: Request<av1::SessionRef>,
    ) -> Result<Response<av1::Session>, Status> {
        let tenant = self.tenant(&request)?;
        let view = ops::get(&self.state, &tenant, &request.into_inner().id)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(session_of(&view)))
    }

    async fn list(
        &self,
        request: Request<av1::ListSessionsRequest>,
    ) -> Result<Response<av1::SessionList>, Status> {
        let tenant = self.tenant(&request)?;
        let sessions = ops::list(&self.state, &tenant).await;
        Ok(Response::new(av1::SessionList {
            sessions: sessions.iter().map(session_of).collect(),
        }))
    }

    async fn send(
        &self,
        request: Request<av1::SendRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let tenant = self.tenant(&request)?;
        let req = request.into_inner();
        crate::sessions::SessionAddr::parse(&req.id).map_err(|e| status_of(&e))?;
        let admission = tenant.admit().map_err(|e| status_of(&e))?;
        let (sampling, max_tokens, top) = sampling_of(req.sampling);
        let top =
            api::top_logprobs("top_logprobs", top, &self.state.cfg).map_err(|e| status_of(&e))?;
        let msg = ops::Message {
            content: Some(Content::Text(req.content)),
            sampling,
            max_tokens,
            top_logprobs: top,
        };
        let turn = ops::send(&self.state, &tenant, &req.id, http::new_id("chatcmpl"), msg)
            .map_err(|e| status_of(&e))?;
        let events = turn.events;
        Ok(Response::new(self.stream(
            turn.request_id,
            admission,
            Dialect::Chat,
            1,
            None,
            events,
        )))
    }

    async fn fork(
        &self,
        request: Request<av1::SessionRef>,
    ) -> Result<Response<av1::Session>, Status> {
        let tenant = self.tenant(&request)?;
        let view = ops::fork(&self.state, &tenant, &request.into_inner().id)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(session_of(&view)))
    }

    async fn rewind(
        &self,
        request: Request<av1::RewindRequest>,
    ) -> Result<Response<av1::Session>, Status> {
        let tenant = self.tenant(&request)?;
        let req = request.into_inner();
        let view = ops::rewind(&self.state, &tenant, &req.id, i64::from(req.turn))
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(session_of(&view)))
    }

    async fn export(
        &self,
        request: Request<av1::SessionRef>,
    ) -> Result<Response<av1::SessionState>, Status> {
        let tenant = self.tenant(&request)?;
        let (addr, data) = ops::export(&self.state, &tenant, &request.into_inner().id)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(av1::SessionState {
            id: addr.public_id(),
            data,
        }))
    }

    async fn import(
        &self,
        request: Request<av1::ImportRequest>,
    ) -> Result<Response<av1::Session>, Status> {
        let tenant = self.tenant(&request)?;
        let req = request.into_inner();
        let model = Some(req.model).filter(|m| !m.is_empty());
        let view = ops::import(&self.state, &tenant, model, req.data)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(session_of(&view)))
    }

    async fn delete(
        &self,
        request: Request<av1::SessionRef>,
    ) -> Result<Response<av1::DeleteSessionResponse>, Status> {
        let tenant = self.tenant(&request)?;
        ops::delete(&self.state, &tenant, &request.into_inner().id)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(av1::DeleteSessionResponse {}))
    }
}
