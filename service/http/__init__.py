"""The HTTP edge: routes (``routes``), request and response models (``schemas``), domain result to
HTTP model (``responses``), and the uvicorn protocol with connection limits (``guard``). Only this
package knows FastAPI models; it calls the engine, the registry and the live catalogue."""
