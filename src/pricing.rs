//! Pure price arithmetic over the catalog (being written).
