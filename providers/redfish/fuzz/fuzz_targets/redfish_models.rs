//! Fuzzes the Redfish JSON models (service root, collections, systems, managers, virtual
//! media, tasks, error bodies) with arbitrary bytes: parsing must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pcg_redfish::model::parse_all(data);
});
