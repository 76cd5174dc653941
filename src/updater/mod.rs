//! The on-box updater: the update engine, the box layout and the web API.

pub mod commands;
pub mod config;
pub mod engine;
pub mod fault;
pub mod guard;
pub mod health;
pub mod http;
pub mod layout;
pub mod lock;
pub mod log;
pub mod report;
pub mod states;
pub mod status;
pub mod systemd;
pub mod units;
pub mod web;
