//! The tunnel's gRPC codec: prost, with small per-stream buffers.
//!
//! tonic gives every stream an 8 KiB encode buffer and an 8 KiB decode buffer from the start.
//! A tunnel stays open for days carrying heartbeats of a few dozen bytes, so at 10,000 tunnels
//! those buffers alone held 160 MB of the broker (heaptrack, BENCHMARKS.md "Memory per idle
//! tunnel"). Here they start at 1 KiB and grow when a larger frame passes.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size (and growth step) of each stream's encode and decode buffers.
pub const BUFFER_BYTES: usize = 1024;
/// Bytes encoded before a stream yields to others (tonic's default).
const YIELD_BYTES: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_BYTES)
}

/// prost encoding with [`BUFFER_BYTES`] buffers; named by the generated client and server.
#[derive(Debug, Clone)]
pub struct TunnelCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for TunnelCodec<T, U> {
    fn default() -> Self {
        TunnelCodec(PhantomData)
    }
}

impl<T, U> Codec for TunnelCodec<T, U>
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
