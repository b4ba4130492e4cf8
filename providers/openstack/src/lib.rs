//! pcg-openstack: placeholder; the driver is being written.
