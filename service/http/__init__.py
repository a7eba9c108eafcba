"""The HTTP edge: routes (``routes``), domain result to HTTP model (``responses``), and the uvicorn
protocol with connection limits (``guard``). The request and response models are ``service.schemas``
(the engine reads the request model too); ``service.openapi`` writes the committed OpenAPI document.
Calls the engine, the registry and the live catalogue; only the app factories and the server
import this package."""
