//! Runtime plugin management, for the admin. Each handler calls the plugins service once.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiJson, App, AppError};
use crate::plugins::Plugin;

#[derive(Debug, Serialize, ToSchema)]
pub struct PluginAdapter {
    pub name: String,
    pub scale: f32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PluginView {
    pub name: String,
    /// `ready` or `failed`.
    pub status: &'static str,
    pub version: Option<String>,
    pub description: Option<String>,
    pub path: String,
    pub sha256: Option<String>,
    pub generation: Option<u64>,
    pub adapters: Vec<PluginAdapter>,
    /// Why it failed.
    pub error: Option<String>,
}

fn view(plugin: &Plugin) -> PluginView {
    PluginView {
        name: plugin.info.name.clone(),
        status: "ready",
        version: Some(plugin.info.version.clone()),
        description: Some(plugin.info.description.clone()),
        path: plugin.path.display().to_string(),
        sha256: Some(plugin.sha256.clone()),
        generation: Some(plugin.generation),
        adapters: plugin
            .info
            .adapters
            .iter()
            .map(|a| PluginAdapter {
                name: a.name.clone(),
                scale: a.scale,
            })
            .collect(),
        error: None,
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PluginList {
    pub object: &'static str,
    pub data: Vec<PluginView>,
}

/// Every plugin, ready or failed.
#[utoipa::path(get, path = "/v1/plugins", tag = "Plugins", responses((status = 200, body = PluginList)))]
pub async fn list_plugins(State(app): State<Arc<App>>) -> Json<PluginList> {
    let data = app
        .plugins
        .list()
        .into_iter()
        .map(|(name, state)| match state {
            Ok(plugin) => view(&plugin),
            Err((path, error, version)) => PluginView {
                name,
                status: "failed",
                version,
                description: None,
                path: path.display().to_string(),
                sha256: None,
                generation: None,
                adapters: Vec::new(),
                error: Some(error),
            },
        })
        .collect();
    Json(PluginList { object: "list", data })
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct LoadPluginRequest {
    /// A library under the plugins directory (absolute, or relative to it).
    pub path: String,
}

/// Loads a plugin library: a new generation when its name is already served.
#[utoipa::path(post, path = "/v1/plugins/load", tag = "Plugins", request_body = LoadPluginRequest,
    responses((status = 200, body = PluginView), (status = 400, body = super::error::ErrorResponse)))]
pub async fn load_plugin(State(app): State<Arc<App>>, ApiJson(req): ApiJson<LoadPluginRequest>) -> Result<Json<PluginView>, AppError> {
    let plugin = app.plugins.load(req.path.into()).await?;
    Ok(Json(view(&plugin)))
}

/// Loads the plugin's file again (a rebuilt library becomes a new generation; requests in
/// flight finish on the old one).
#[utoipa::path(post, path = "/v1/plugins/{name}/reload", tag = "Plugins",
    params(("name" = String, Path, description = "A plugin name")),
    responses((status = 200, body = PluginView), (status = 404, body = super::error::ErrorResponse)))]
pub async fn reload_plugin(State(app): State<Arc<App>>, Path(name): Path<String>) -> Result<Json<PluginView>, AppError> {
    let plugin = app.plugins.reload(name).await?;
    Ok(Json(view(&plugin)))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PluginStatus {
    pub name: String,
    pub status: &'static str,
}

/// Stops serving a plugin; requests in flight finish on it, then its library is closed.
#[utoipa::path(post, path = "/v1/plugins/{name}/unload", tag = "Plugins",
    params(("name" = String, Path, description = "A plugin name")),
    responses((status = 200, body = PluginStatus), (status = 404, body = super::error::ErrorResponse)))]
pub async fn unload_plugin(State(app): State<Arc<App>>, Path(name): Path<String>) -> Result<Json<PluginStatus>, AppError> {
    app.plugins.unload(&name)?;
    Ok(Json(PluginStatus { name, status: "unloaded" }))
}
