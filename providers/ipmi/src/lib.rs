//! pcg-ipmi (placeholder, being written).
