//! Fuzzes protobuf decoding of tunnel frames in both directions: never panics, and a decoded
//! frame re-encodes to bytes that decode to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pcg_proto::v1::{BrokerFrame, GatewayFrame};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = GatewayFrame::decode(data) {
        let again = GatewayFrame::decode(f.encode_to_vec().as_slice()).expect("re-encoded frame decodes");
        assert_eq!(again, f);
    }
    if let Ok(f) = BrokerFrame::decode(data) {
        let again = BrokerFrame::decode(f.encode_to_vec().as_slice()).expect("re-encoded frame decodes");
        assert_eq!(again, f);
    }
});
