//! pcg-redfish (placeholder, being written).
