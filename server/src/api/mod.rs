//! The OpenAI-compatible HTTP API (axum). Routes and their OpenAPI description come from the
//! same `utoipa` annotations, so they cannot drift apart.

mod adapters;
mod batches;
mod chat;
mod completions;
mod console;
mod embeddings;
pub mod auth;
pub mod error;
mod extensions;
mod middleware;
mod models;
mod plugins;
mod respond;
mod responses;
mod tuning;
pub mod types;
mod validate;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::plugins::PluginHost;
use crate::registry::Registry;
use crate::services::adapters::Adapters;
use crate::services::batches::Batches;
use crate::services::inference::{Inference, Leases};
use crate::services::plugins::Plugins;
use crate::services::responses::Responses;
use crate::services::tuning::Tuning;
use crate::store::blobs::Blobs;
use crate::store::{StateLocation, Store};
use crate::train::job::Tuner;
use crate::LoadedModel;
pub use error::AppError;

/// What the HTTP layer needs to know about the deployment.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub ctx_len: usize,
    /// The keys requests must present, by scope (none: the server is open).
    pub keys: auth::Keys,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    /// Scanned for adapters at startup, and where `load_lora_adapter` may read from.
    pub adapters_dir: Option<std::path::PathBuf>,
    /// More directories `load_lora_adapter` may read from.
    pub adapter_roots: Vec<std::path::PathBuf>,
    /// Bytes of adapter weights kept in memory; least recently used unleased ones are evicted.
    pub max_adapter_memory: Option<usize>,
    /// Online tuning (feedback, files, fine-tuning jobs): where its store lives and how it
    /// trains. Without it those routes answer that tuning is off.
    pub tuning: Option<TuningConfig>,
    /// Runtime domain plugins: where they may be loaded from. Without it, none load.
    pub plugins: Option<PluginsConfig>,
}

#[derive(Debug, Clone)]
pub struct PluginsConfig {
    /// Scanned at startup; `POST /v1/plugins/load` accepts only files under it.
    pub dir: std::path::PathBuf,
    /// When set, only libraries with these sha256 digests (hex) load.
    pub allow_sha256: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct TuningConfig {
    /// Adapter versions and checkpoints (shared by the servers of a group), and the SQLite
    /// database unless `state` says otherwise.
    pub root: std::path::PathBuf,
    /// Where the rows live [default: SQLite under `root`].
    pub state: Option<crate::store::StateLocation>,
    /// An object store for the folders, `root` then being this server's cache [default: the
    /// folders in place under `root`].
    pub blobs: Option<crate::store::blobs::BlobLocation>,
    pub settings: crate::train::job::TuningSettings,
}

/// Shared application state: `State<Arc<App>>` in every handler. Handlers reach the model,
/// adapters, tuning and plugins only through their services.
pub struct App {
    pub created: u64,
    pub settings: ApiSettings,
    pub metrics: Arc<Metrics>,
    pub inference: Arc<Inference>,
    pub adapters: Arc<Adapters>,
    pub tuning: Tuning,
    pub plugins: Arc<Plugins>,
    pub responses: Arc<Responses>,
    pub batches: Arc<Batches>,
}

impl App {
    /// Starts an engine on `model` and the services over it. The engine thread ends when the
    /// last handle to the app is dropped and its work is done.
    pub fn start(
        model: Arc<LoadedModel>,
        model_id: String,
        settings: ApiSettings,
        engine: crate::engine::EngineConfig,
    ) -> std::io::Result<Arc<Self>> {
        let metrics = Arc::new(Metrics::new());
        let roots: Vec<_> = settings.adapters_dir.iter().chain(&settings.adapter_roots).cloned().collect();
        let base = model.model.config().adapter_shape();
        let registry = Arc::new(Registry::new(base.clone(), &model_id, &roots, settings.max_adapter_memory));
        registry.measure_against(model.clone());
        if let Some(dir) = &settings.adapters_dir {
            let found = registry.scan(dir).map_err(std::io::Error::other)?;
            tracing::info!(dir = %dir.display(), found, "adapters registered");
        }
        let (tuner, store) = match &settings.tuning {
            None => (None, None),
            Some(tuning) => {
                let state = tuning.state.clone().unwrap_or_else(|| StateLocation::sqlite_under(&tuning.root));
                let mut store = Store::open_at(&state, &tuning.root).map_err(std::io::Error::other)?;
                if let Some(blobs) = &tuning.blobs {
                    store = store.with_blobs(Blobs::open(blobs).map_err(std::io::Error::other)?);
                }
                let store = Arc::new(store);
                metrics.register(store.latency().clone());
                let tuner = Tuner::start(store.clone(), model.clone(), model_id.clone(), registry.clone(), tuning.settings.clone())
                    .map_err(std::io::Error::other)?;
                metrics.register(tuner.sync().notification_lag.clone());
                (Some(tuner), Some(store))
            }
        };
        let host = PluginHost::new(
            settings.plugins.as_ref().map(|p| p.dir.as_path()),
            settings.plugins.as_ref().and_then(|p| p.allow_sha256.clone()),
            crate::plugins::private_cache_dir(),
        );
        let plugins = Arc::new(Plugins::new(host, registry.clone(), tuner.clone()));
        let adapters = Arc::new(Adapters::new(registry.clone(), tuner.clone(), settings.adapters_dir.clone(), base, model_id.clone(), settings.max_body_bytes));
        let grammars = Arc::new(crate::grammar::Grammars::for_model(model.clone())?);
        let warming = grammars.warm_up();
        let tuning = Tuning::new(tuner, adapters.clone(), plugins.clone(), grammars.clone(), model_id.clone());
        let (engine, _thread) = Engine::start(model.clone(), engine, metrics.clone())?;
        let inference = Arc::new(Inference::new(engine, model, model_id, settings.ctx_len, registry, plugins.clone(), grammars));
        let responses = Arc::new(Responses::new(inference.clone(), store.clone()));
        plugins.load_dir();
        warming.finish();
        let app = Arc::new(Self {
            created: unix_time(),
            settings,
            metrics,
            inference,
            adapters,
            tuning,
            plugins,
            responses,
            batches: Arc::new(Batches::new(store)),
        });
        app.batches.start(Arc::new(batches::RouterLines { app: Arc::downgrade(&app) }))?;
        Ok(app)
    }
}

/// Response header naming the adapter generations a request leased (`name@generation`, comma
/// separated), so a client can tell which version of an adapter answered.
pub const ADAPTER_GENERATIONS_HEADER: &str = "x-tessera-adapter-generations";

/// Adds [`ADAPTER_GENERATIONS_HEADER`] to a response when the request used adapters.
fn with_generations(mut response: axum::response::Response, leases: &Leases) -> axum::response::Response {
    if leases.is_empty() {
        return response;
    }
    let value = leases
        .iter()
        .map(|(g, _)| format!("{}@{}", g.name, g.generation))
        .collect::<Vec<_>>()
        .join(",");
    if let Ok(value) = axum::http::HeaderValue::from_str(&value) {
        response.headers_mut().insert(ADAPTER_GENERATIONS_HEADER, value);
    }
    response
}

/// `axum::Json`, with its rejections (bad JSON, wrong types, too large) in OpenAI's error shape.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    axum::Json<T>: FromRequest<S, Rejection = axum::extract::rejection::JsonRejection>,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(AppError::BadBody {
                status: rejection.status(),
                message: rejection.body_text(),
            }),
        }
    }
}

/// `axum::extract::Query`, with its rejection (a malformed or mistyped parameter) in OpenAI's
/// error shape.
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(AppError::BadBody { status: rejection.status(), message: rejection.body_text() }),
        }
    }
}

/// A multipart form, its rejection in OpenAI's error shape (axum's own is plain text).
pub struct ApiMultipart(pub axum::extract::Multipart);

impl<S> FromRequest<S> for ApiMultipart
where
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Multipart::from_request(req, state).await {
            Ok(form) => Ok(Self(form)),
            Err(rejection) => Err(AppError::BadBody {
                status: rejection.status(),
                message: rejection.body_text(),
            }),
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tessera",
        description = "OpenAI-compatible inference for one quantized base model and its LoRA adapters."
    ),
    components(schemas(error::ErrorResponse))
)]
struct ApiDoc;

/// Every route, grouped by the scope its callers need (`auth`): the layer of each group checks
/// the key; no rule looks at the path.
fn api_routes(app: Option<&Arc<App>>) -> OpenApiRouter<Arc<App>> {
    let public = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(models::health))
        .routes(routes!(models::scope))
        .routes(routes!(models::openapi_json));
    let inference = OpenApiRouter::new()
        .routes(routes!(chat::chat_completions))
        .routes(routes!(completions::completions))
        .routes(routes!(embeddings::embeddings))
        .routes(routes!(responses::create_response))
        .routes(routes!(responses::get_response, responses::delete_response))
        .routes(routes!(models::list_models))
        .routes(routes!(models::get_model))
        .routes(routes!(extensions::tokenize))
        .routes(routes!(extensions::detokenize));
    let tune = OpenApiRouter::new()
        .routes(routes!(tuning::upload_feedback, tuning::list_feedback, tuning::delete_feedback))
        .routes(routes!(tuning::list_preferences, tuning::delete_preferences))
        .routes(routes!(tuning::train_adapter))
        .routes(routes!(adapters::download_adapter))
        .routes(routes!(tuning::upload_file, tuning::list_files))
        .routes(routes!(tuning::get_file))
        .routes(routes!(tuning::get_file_content))
        .routes(routes!(batches::create_batch, batches::list_batches))
        .routes(routes!(batches::get_batch))
        .routes(routes!(batches::cancel_batch))
        .routes(routes!(tuning::create_job, tuning::list_jobs))
        .routes(routes!(tuning::get_job))
        .routes(routes!(tuning::cancel_job))
        .routes(routes!(tuning::list_events))
        .routes(routes!(tuning::list_checkpoints));
    let admin = OpenApiRouter::new()
        .routes(routes!(models::metrics))
        .routes(routes!(adapters::load_lora_adapter))
        .routes(routes!(adapters::unload_lora_adapter))
        .routes(routes!(adapters::list_adapters, adapters::upload_adapter))
        .routes(routes!(adapters::get_adapter, adapters::delete_adapter))
        .routes(routes!(tuning::rollback_adapter))
        .routes(routes!(tuning::set_tuning_access))
        .routes(routes!(plugins::list_plugins))
        .routes(routes!(plugins::load_plugin))
        .routes(routes!(plugins::reload_plugin))
        .routes(routes!(plugins::unload_plugin));
    let guarded = |group: OpenApiRouter<Arc<App>>, scope: auth::Scope| match app {
        Some(app) => group.route_layer(axum::middleware::from_fn_with_state((app.clone(), scope), auth::require)),
        None => group,
    };
    public
        .merge(guarded(inference, auth::Scope::Inference))
        .merge(guarded(tune, auth::Scope::Tune))
        .merge(guarded(admin, auth::Scope::Admin))
}

/// The OpenAPI description of every route (what `openapi.yaml` holds).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = api_routes(None).split_for_parts().1;
    declare_layer_responses(&mut doc);
    doc
}

/// Declares, on each operation, the errors the layers around every handler answer with (in
/// OpenAI's error shape), besides those the handler itself declares: a panic (500), the
/// shutdown (503) and the timeout (408) anywhere; a missing or weak key (401, 403) on guarded
/// routes; a malformed, oversized or mistyped body (400, 413, 415, 422) where there is one; and
/// a parameter naming nothing (404) or malformed (400) where there are parameters.
fn declare_layer_responses(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{Ref, ResponseBuilder};
    const PUBLIC: [&str; 2] = ["/health", "/openapi.json"];
    let error = || {
        ResponseBuilder::new()
            .description("An error, in OpenAI's shape")
            .content("application/json", utoipa::openapi::ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorResponse"))).build())
            .build()
    };
    for (path, item) in doc.paths.paths.iter_mut() {
        let operations = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
        for operation in operations.into_iter().flatten() {
            let mut statuses = vec!["408", "500", "503"];
            if !PUBLIC.contains(&path.as_str()) {
                statuses.extend(["401", "403"]);
            }
            if operation.request_body.is_some() {
                statuses.extend(["400", "413", "415", "422"]);
            }
            if operation.parameters.as_ref().is_some_and(|ps| !ps.is_empty()) {
                statuses.extend(["400", "404"]);
            }
            for status in statuses {
                operation.responses.responses.entry(status.to_string()).or_insert_with(|| error().into());
            }
        }
    }
}

/// The full service: routes, authentication, metrics, timeouts, body limit and panic recovery.
pub fn router(app: Arc<App>) -> Router {
    let (routes, _) = api_routes(Some(&app)).split_for_parts();
    with_service_layers(app, routes.merge(console::routes()))
}

/// Wraps `routes` in the layers every route gets: timeout, metrics, panic recovery and the body
/// limit (each route group checks its own keys); unknown routes get a 404 in OpenAI's shape.
pub fn with_service_layers(app: Arc<App>, routes: Router<Arc<App>>) -> Router {
    routes
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            middleware::timeout,
        ))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            middleware::record_metrics,
        ))
        .layer(CatchPanicLayer::custom(middleware::panic_response))
        .layer(DefaultBodyLimit::max(app.settings.max_body_bytes))
        .fallback(|| async { AppError::NotFound("No such route.".into()) })
        .with_state(app)
}

/// Serves `router(app)` on `listener` until `shutdown` resolves, then finishes the requests in
/// flight.
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Seconds since the Unix epoch, for `created` fields.
pub fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
