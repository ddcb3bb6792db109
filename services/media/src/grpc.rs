//! The tonic adapter: converts requests and errors, holds no logic.

use std::sync::Arc;

use messenger_proto::v1::{self as pb, media_service_server::MediaService};
use tonic::{Request, Response, Status};

use crate::service::Service;

/// Most media ids one DescribeMedia or DeleteMedia may name.
const MAX_IDS_PER_CALL: usize = 100;

pub struct Adapter {
    pub service: Arc<Service>,
}

fn user(user_id: &str) -> Result<&str, Status> {
    if user_id.is_empty() { Err(Status::invalid_argument("user_id is required")) } else { Ok(user_id) }
}

fn ids(media_ids: &[String]) -> Result<(), Status> {
    if media_ids.len() > MAX_IDS_PER_CALL {
        return Err(Status::invalid_argument(format!(
            "{} media ids in one call; the limit is {MAX_IDS_PER_CALL}",
            media_ids.len()
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl MediaService for Adapter {
    async fn create_upload(
        &self,
        request: Request<pb::MediaCreateUploadRequest>,
    ) -> Result<Response<pb::CreateUploadResponse>, Status> {
        let request = request.into_inner();
        let upload = request.upload.ok_or_else(|| Status::invalid_argument("upload is required"))?;
        Ok(Response::new(self.service.create_upload(user(&request.user_id)?, upload).await?))
    }

    async fn get_upload(
        &self,
        request: Request<pb::MediaGetUploadRequest>,
    ) -> Result<Response<pb::CreateUploadResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(self.service.get_upload(user(&request.user_id)?, &request.media_id).await?))
    }

    async fn complete_upload(
        &self,
        request: Request<pb::MediaCompleteUploadRequest>,
    ) -> Result<Response<pb::CompleteUploadResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(self.service.complete_upload(user(&request.user_id)?, &request.media_id).await?))
    }

    async fn get_media_url(
        &self,
        request: Request<pb::MediaGetMediaUrlRequest>,
    ) -> Result<Response<pb::GetMediaUrlResponse>, Status> {
        let request = request.into_inner();
        let inner = request.request.ok_or_else(|| Status::invalid_argument("request is required"))?;
        Ok(Response::new(self.service.get_url(user(&request.user_id)?, inner).await?))
    }

    async fn describe_media(
        &self,
        request: Request<pb::DescribeMediaRequest>,
    ) -> Result<Response<pb::DescribeMediaResponse>, Status> {
        let request = request.into_inner();
        ids(&request.media_ids)?;
        let attachments = self
            .service
            .describe(user(&request.sender_id)?, &request.conversation_id, &request.client_msg_id, &request.media_ids)
            .await?;
        Ok(Response::new(pb::DescribeMediaResponse { attachments }))
    }

    async fn delete_media(
        &self,
        request: Request<pb::DeleteMediaRequest>,
    ) -> Result<Response<pb::DeleteMediaResponse>, Status> {
        let request = request.into_inner();
        ids(&request.media_ids)?;
        self.service.delete(&request.conversation_id, &request.media_ids).await?;
        Ok(Response::new(pb::DeleteMediaResponse {}))
    }
}
