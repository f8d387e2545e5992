//! Runtime plugin management (admin), and the plugin side of a chat request.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{blocking, ApiJson, App, AppError};
use crate::plugins::{Plugin, PluginError};

impl From<PluginError> for AppError {
    fn from(e: PluginError) -> Self {
        match e {
            PluginError::NotFound(_) => AppError::NotFound(e.to_string()),
            PluginError::Refused(message) => AppError::InvalidParameter {
                message,
                param: None,
                code: Some("plugin_refused"),
            },
            PluginError::Panicked { .. } | PluginError::Garbage { .. } | PluginError::Failed { .. } => {
                AppError::PluginFailed(e.to_string())
            }
            other => AppError::InvalidParameter {
                message: other.to_string(),
                param: Some("path".into()),
                code: Some("plugin_load_failed"),
            },
        }
    }
}

/// A plugin call on behalf of a request: a misbehaving plugin is marked failed.
pub fn contain<T>(app: &App, plugin: &Plugin, result: Result<T, PluginError>) -> Result<T, AppError> {
    result.map_err(|e| fault(app, plugin, e))
}

/// The request's error for `e`; a plugin at fault is marked failed first.
pub fn fault(app: &App, plugin: &Plugin, e: PluginError) -> AppError {
    if e.is_plugin_fault() {
        app.plugins.mark_failed(plugin, &e);
    }
    AppError::from(e)
}

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

async fn load(app: Arc<App>, path: std::path::PathBuf) -> Result<Json<PluginView>, AppError> {
    let plugin = blocking(move || Ok(app.load_plugin(&path)?)).await?;
    Ok(Json(view(&plugin)))
}

/// Loads a plugin library: a new generation when its name is already served.
#[utoipa::path(post, path = "/v1/plugins/load", tag = "Plugins", request_body = LoadPluginRequest,
    responses((status = 200, body = PluginView), (status = 400, body = super::error::ErrorResponse)))]
pub async fn load_plugin(State(app): State<Arc<App>>, ApiJson(req): ApiJson<LoadPluginRequest>) -> Result<Json<PluginView>, AppError> {
    load(app, std::path::PathBuf::from(req.path)).await
}

/// Loads the plugin's file again (a rebuilt library becomes a new generation; requests in
/// flight finish on the old one).
#[utoipa::path(post, path = "/v1/plugins/{name}/reload", tag = "Plugins",
    params(("name" = String, Path, description = "A plugin name")),
    responses((status = 200, body = PluginView), (status = 404, body = super::error::ErrorResponse)))]
pub async fn reload_plugin(State(app): State<Arc<App>>, Path(name): Path<String>) -> Result<Json<PluginView>, AppError> {
    let path = app.plugins.path_of(&name).ok_or_else(|| AppError::from(PluginError::NotFound(name)))?;
    load(app, path).await
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
