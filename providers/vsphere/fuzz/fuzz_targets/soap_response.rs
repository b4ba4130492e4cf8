//! Fuzzes the SOAP response parser with arbitrary bytes: envelope, faults, RetrievePropertiesEx
//! results (objects, missingSet, tokens), VM properties, service content and task errors must
//! never panic, and a parsed tree must serialise back to XML that parses again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pcg_vsphere::fault::Fault;
use pcg_vsphere::soap::{missing_set_fault, parse_response, parse_retrieve_result, ParsedError, ServiceContent};

fuzz_target!(|data: &[u8]| {
    let doc = String::from_utf8_lossy(data);
    if let Ok(tree) = pcg_vsphere::xml::parse(&doc) {
        let again = format!(
            "<w xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" xmlns:xsd=\"x\">{}</w>",
            tree.to_xml()
        );
        assert!(pcg_vsphere::xml::parse(&again).is_ok(), "re-serialised tree does not parse");
    }
    match parse_response(&doc) {
        Ok(rv) => {
            let _ = missing_set_fault(rv.as_ref());
            let (objs, _token) = parse_retrieve_result(rv.as_ref());
            for o in &objs {
                let _ = pcg_vsphere::vm_info(o);
                if let Some(e) = o.get("info").and_then(|i| i.child("error")) {
                    let _ = Fault::from_localized(e).kind();
                }
            }
            if let Some(rv) = &rv {
                let _ = ServiceContent::from_node(rv);
            }
        }
        Err(ParsedError::Fault(f)) => {
            let _ = f.kind();
            let _ = f.into_error("https://vc/sdk", "u", "op").to_string();
        }
        Err(ParsedError::Malformed(_)) => {}
    }
});
