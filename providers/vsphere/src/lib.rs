//! pcg-vsphere: placeholder; the driver is being written.
