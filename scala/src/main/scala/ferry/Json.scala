package ferry

import scala.jdk.CollectionConverters._

import com.fasterxml.jackson.databind.ObjectMapper

/** JSON for stage params (Jackson, as shipped with Spark). */
private[ferry] object Json {
  private val mapper = new ObjectMapper()

  /** Encodes a Scala or Java value tree: maps, sequences, arrays, options, numbers, strings, booleans. */
  def encode(value: Any): String = mapper.writeValueAsString(toJava(value))

  /** Decodes a JSON object into a Java map (values are Java lists, maps, numbers, strings, booleans). */
  def decodeObject(json: String): java.util.Map[String, Object] = {
    val node = mapper.readTree(if (json == null || json.trim.isEmpty) "{}" else json)
    if (!node.isObject) throw new IllegalArgumentException(s"expected a JSON object, got: $json")
    mapper.convertValue(node, classOf[java.util.Map[String, Object]])
  }

  /** Whether `json` parses as a JSON object. */
  def isObject(json: String): Boolean =
    try mapper.readTree(json).isObject
    catch { case _: Exception => false }

  private def toJava(v: Any): Any = v match {
    case null | None => null
    case Some(x) => toJava(x)
    case m: collection.Map[_, _] =>
      val out = new java.util.LinkedHashMap[String, Any]()
      m.foreach { case (k, x) => out.put(k.toString, toJava(x)) }
      out
    case m: java.util.Map[_, _] =>
      val out = new java.util.LinkedHashMap[String, Any]()
      m.asScala.foreach { case (k, x) => out.put(k.toString, toJava(x)) }
      out
    case a: Array[_] => a.toSeq.map(toJava).asJava
    case s: IterableOnce[_] => s.iterator.map(toJava).toSeq.asJava
    case l: java.lang.Iterable[_] => l.asScala.map(toJava).toSeq.asJava
    case x => x
  }
}
