//! Fuzzes encode → decode of authenticated, encrypted session packets: every payload must come
//! back unchanged, and any flipped bit must be rejected by the integrity check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pcg_ipmi::packet::{decode, encode, payload, Keys};

fuzz_target!(|input: (u32, u32, [u8; 16], Vec<u8>, u16)| {
    let (sid, seq, iv, data, flip) = input;
    if data.len() > 1024 {
        return;
    }
    let keys = Keys::from_sik(&[0x17; 20]);
    let pkt = encode(payload::IPMI, sid, seq, &data, Some((&keys, iv)));
    let back = decode(&pkt, Some(&keys)).expect("own packet decodes");
    assert_eq!(back.payload, data);
    assert_eq!((back.session_id, back.seq), (sid, seq));
    let mut bad = pkt.clone();
    let at = 4 + flip as usize % (bad.len() - 4);
    bad[at] ^= 0x01;
    assert!(decode(&bad, Some(&keys)).is_err(), "flipped bit at {at} accepted");
});
