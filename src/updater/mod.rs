//! The on-box updater: the update engine, the box layout and the web API.
