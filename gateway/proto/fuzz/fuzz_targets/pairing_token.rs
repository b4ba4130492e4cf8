//! Fuzzes pairing-token decoding: any string either decodes to a token that re-encodes to an
//! equal token, or is refused with an error; it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pcg_proto::pairing::PairingToken;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(t) = PairingToken::decode(s) {
        assert_eq!(PairingToken::decode(&t.encode()).ok(), Some(t));
    }
});
