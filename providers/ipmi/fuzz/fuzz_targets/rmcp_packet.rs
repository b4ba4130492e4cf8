//! Fuzzes the RMCP/RMCP+ datagram parser (session header, integrity trailer, AES-CBC payload,
//! RAKP messages, IPMI responses) with arbitrary bytes: it must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pcg_ipmi::packet::{parse_any, Keys};

fuzz_target!(|data: &[u8]| {
    parse_any(data, &Keys::from_sik(&[0x42; 20]));
});
