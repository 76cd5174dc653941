//! The update server: a watched directory of images served over HTTP.
