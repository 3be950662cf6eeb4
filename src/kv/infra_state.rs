//! Remote infra state on PostgreSQL (see below).
