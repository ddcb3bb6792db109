//! The codec every generated client and server uses: prost encoding with
//! smaller initial buffers than tonic's default 8 KiB each way.
//!
//! Why: a gateway holds one long-lived Connect stream per device, and each
//! stream keeps an encode and a decode buffer for its whole life. Messenger
//! frames are a few hundred bytes, so 8 KiB per direction was most of a
//! session's memory. Buffers still grow for larger messages (history pages).

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial encode/decode buffer per call or stream, in bytes.
pub const INITIAL_BUFFER_BYTES: usize = 1024;
/// tonic's default: how much a stream encodes before yielding.
const YIELD_THRESHOLD: usize = 32 * 1024;

#[derive(Debug, Clone)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER_BYTES, YIELD_THRESHOLD)
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
