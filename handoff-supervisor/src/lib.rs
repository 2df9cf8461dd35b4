//! The reference supervisor (`handoff-supervisor`) and its client (`handoffctl`).

pub mod cli;
pub mod config;
pub mod ctl;
pub mod journal_start;
pub mod notify;
pub mod report;
pub mod server;
pub mod trigger;
