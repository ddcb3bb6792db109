//! The tonic adapter: converts requests and errors, holds no logic.

use std::sync::Arc;

use messenger_proto::v1::{self as pb, notify_service_server::NotifyService};
use tonic::{Request, Response, Status};

use crate::{
    service::{Service, device_to_proto},
    store::Mute,
};

pub struct Adapter {
    pub service: Arc<Service>,
}

#[tonic::async_trait]
impl NotifyService for Adapter {
    async fn register_device(
        &self,
        request: Request<pb::NotifyRegisterDeviceRequest>,
    ) -> Result<Response<pb::RegisterPushDeviceResponse>, Status> {
        let request = request.into_inner();
        let device = request.device.ok_or_else(|| Status::invalid_argument("device is required"))?;
        let (device, webhook_secret) = self.service.register(&request.user_id, device).await?;
        Ok(Response::new(pb::RegisterPushDeviceResponse { device: Some(device_to_proto(&device)), webhook_secret }))
    }

    async fn unregister_device(
        &self,
        request: Request<pb::NotifyUnregisterDeviceRequest>,
    ) -> Result<Response<pb::UnregisterPushDeviceResponse>, Status> {
        let request = request.into_inner();
        let removed = self.service.unregister(&request.user_id, &request.device_id).await?;
        Ok(Response::new(pb::UnregisterPushDeviceResponse { removed }))
    }

    async fn list_devices(
        &self,
        request: Request<pb::NotifyListDevicesRequest>,
    ) -> Result<Response<pb::ListPushDevicesResponse>, Status> {
        let devices = self.service.devices(&request.into_inner().user_id).await?;
        Ok(Response::new(pb::ListPushDevicesResponse { devices: devices.iter().map(device_to_proto).collect() }))
    }

    async fn mute_conversation(
        &self,
        request: Request<pb::NotifyMuteRequest>,
    ) -> Result<Response<pb::MuteConversationResponse>, Status> {
        let request = request.into_inner();
        let mute = Mute { until_ms: request.muted_until_ms, mentions_only: request.mentions_only };
        self.service.mute(&request.user_id, &request.conversation_id, mute).await?;
        Ok(Response::new(pb::MuteConversationResponse {}))
    }

    async fn enqueue(&self, request: Request<pb::EnqueueRequest>) -> Result<Response<pb::EnqueueResponse>, Status> {
        let queued = self.service.enqueue(request.into_inner().entries).await?;
        Ok(Response::new(pb::EnqueueResponse { queued: queued as u32 }))
    }

    async fn read(&self, request: Request<pb::NotifyReadRequest>) -> Result<Response<pb::NotifyReadResponse>, Status> {
        let request = request.into_inner();
        let outcome = self.service.read(&request.user_id, &request.conversation_id, request.read_seq).await?;
        Ok(Response::new(pb::NotifyReadResponse {
            cancelled: outcome.cancelled as u32,
            retracted: outcome.retracted as u32,
        }))
    }
}
